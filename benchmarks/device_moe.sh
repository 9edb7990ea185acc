#!/usr/bin/env bash
# On the GPU machine: the Qwen3-MoE work (issue 6), one part per call so each stays under the 10-minute limit.
#   kernels: the fused-MoE, GEMV and attention kernel tests on CUDA, the GPU engine tests, the MoE layer benchmark
#            (1..512 tokens, bf16 and FP8);
#   sweep:   the MoE GEMV-tile sweep at 1 and 2 tokens;
#   engine:  Qwen3-30B-A3B random bf16 weights: a batch-1 decode profile, then bench_engine (TPOT, TTFT 512/8000,
#            concurrency 1..64, 256 x (1024 in / 256 out));
#   fp8:     the same bench_engine run with --quantization fp8, no concurrency sweep;
#   check:   the GPU tests, then bench_engine with bf16 and with FP8 KV caches (no sweep), each process on a cold
#            Triton cache (what a first engine process on a new machine sees).
# Usage: SWIFTLM_COMMIT=<sha> bash benchmarks/device_moe.sh kernels|sweep|engine|fp8|check OUT_DIR
set -uo pipefail
part=$1; out=$2
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$out"
model=benchmarks/models/qwen3-30b-a3b
commit=${SWIFTLM_COMMIT:-unknown}
case "$part" in
  kernels)
    python3 -m pytest -q tests/test_fused_moe.py tests/test_gemv.py tests/test_attention_kernels.py 2>&1 | tail -4 \
      | tee "$out/kernel_tests.txt"
    python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -6 | tee "$out/gpu_tests.txt"
    python3 benchmarks/bench_moe.py --tokens 1 2 4 8 16 64 512 --json "$out/moe_layer_h100_$commit.json" 2>&1 \
      | tee "$out/moe_layer_h100_$commit.txt" | tail -28
    ;;
  sweep)
    python3 benchmarks/bench_moe.py --tokens 1 2 --sweep --sweep-paths gemv --json "$out/moe_sweep.json" \
      > "$out/moe_sweep.txt" 2>&1
    grep -E "sweep|FAIL" "$out/moe_sweep.txt"
    ;;
  engine)
    python3 benchmarks/profile_engine.py --model $model --num-prompts 0 > "$out/profile.txt" 2>&1
    head -40 "$out/profile.txt"
    python3 benchmarks/bench_engine.py --model $model --skip-hf --iters 2 --concurrency 1 2 4 8 16 32 64 \
      --json "$out/engine_qwen3-30b-a3b_h100_$commit.json" > "$out/engine.txt" 2>&1
    tail -30 "$out/engine.txt"
    ;;
  fp8)
    python3 benchmarks/bench_engine.py --model $model --skip-hf --iters 2 --quantization fp8 \
      --json "$out/engine_qwen3-30b-a3b-fp8_h100_$commit.json" > "$out/engine_fp8.txt" 2>&1
    tail -30 "$out/engine_fp8.txt"
    ;;
  check)
    python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -4 | tee "$out/gpu_tests_h100_$commit.txt"
    for kv in auto fp8; do
      name=qwen3-30b-a3b$([ "$kv" = fp8 ] && echo -kvfp8)
      TRITON_CACHE_DIR=$(mktemp -d) python3 benchmarks/bench_engine.py --model $model --skip-hf --iters 1 \
        --kv-cache-dtype $kv --long-context-batches --json "$out/engine_${name}_coldcache_h100_$commit.json" \
        > "$out/engine_$name.txt" 2>&1
      tail -6 "$out/engine_$name.txt"
    done
    ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
