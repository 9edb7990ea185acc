#!/usr/bin/env bash
# On the GPU machine: Qwen3-8B bf16 bench_engine (batch-1 TPOT, TTFT, 256 x (1024/256) throughput) with the
# decode kernel's fused QK-norm + RoPE for every decode-only step, and only up to 32 rows (larger decode batches
# run the separate rope kernel first), alternated twice in one machine session.
# Usage: SWIFTLM_COMMIT=<sha> bash benchmarks/ab_decode_rope.sh OUT_DIR
set -u
out=$1
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$out"
commit=${SWIFTLM_COMMIT:-unknown}
for run in 1 2; do
  for rows in all 32; do
    limit=$([ "$rows" = all ] && echo 1073741824 || echo "$rows")
    name="engine_qwen3-8b_rope-rows-${rows}_run${run}_h100_$commit"
    python3 -c "
import runpy, sys
import swiftlm.layers.attention as attention
attention.DECODE_ROPE_MAX_ROWS = $limit
sys.argv = ['benchmarks/bench_engine.py', '--skip-hf', '--iters', '1', '--model', 'benchmarks/models/qwen3-8b',
            '--json', '$out/$name.json']
runpy.run_path('benchmarks/bench_engine.py', run_name='__main__')
" > "$out/$name.txt" 2>&1
    echo "rows=$rows run=$run $(grep -E '"(tpot_b1_ms|throughput_output_tok_s)"' "$out/$name.txt" | tr -d '\n ')"
  done
done
