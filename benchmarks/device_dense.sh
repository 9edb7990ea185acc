#!/usr/bin/env bash
# On the GPU machine: decode-path checks and the engine figures of issues 4-6, in parts that each stay under the
# 10-minute limit of one device call.
#   check:      the GEMV / fused-kernel tests on CUDA and the GPU engine tests (bf16 vs transformers, graphs);
#   tpot:       batch-1 decode profile of Qwen3-8B (plus the throughput workload's profile), then bench_engine
#               without the throughput run for Qwen3-8B bf16, Qwen3-8B FP8 and Qwen3-30B-A3B bf16;
#   sweep:      decode GEMV tiles of the fused-input modes (bench_gemv.py --fused, M = 1, 2), then a batch-1 decode
#               profile of Qwen3-8B FP8;
#   throughput: the full bench_engine runs (throughput included) of Qwen3-8B bf16 (first: on a fresh machine its
#               start-up is the cold-Triton-cache figure) and Qwen3-30B-A3B bf16 (with the concurrency sweep), and
#               Qwen3-8B FP8 without the throughput run;
#   attention:  the attention kernel tests and GPU engine tests on CUDA, the Qwen3-8B profile with its
#               throughput run (GPU vs wall time per step kind), the Qwen3-8B bench_engine run, and Qwen3-30B-A3B
#               without the throughput run;
#   ttft:       the attention kernel tests on CUDA, the Qwen3-8B profile without its throughput run, then
#               bench_engine without the throughput run for Qwen3-8B bf16 and FP8 and Qwen3-30B-A3B bf16;
#   async:      the GPU engine and asynchronous-scheduling tests on CUDA, then the full Qwen3-8B bf16 bench_engine
#               run with asynchronous scheduling and without it (the peer in the same run);
#   async-more: the Qwen3-8B profile without its throughput run, bench_engine for Qwen3-8B FP8 (no throughput
#               run) and Qwen3-30B-A3B bf16 (throughput included), all with asynchronous scheduling;
#   rope:       the attention kernel and GPU engine tests on CUDA, the Qwen3-8B profile without its throughput
#               run, the full Qwen3-8B bf16 bench_engine run, then Qwen3-8B FP8 and Qwen3-30B-A3B bf16 without
#               the throughput run;
#   fp8-moe:    the full Qwen3-8B FP8 bench_engine run (throughput included), then Qwen3-30B-A3B bf16 with the
#               closed-loop concurrency sweep 1..64 and the throughput run;
#   cold:       the full Qwen3-8B bench_engine runs (bf16, FP8, FP8 with the FP8 KV cache; one iteration, no
#               long-context batches), each process on a fresh Triton cache.
# Usage: SWIFTLM_COMMIT=<sha> bash benchmarks/device_dense.sh PART OUT_DIR  (PART: one of the above)
set -uo pipefail
part=$1; out=$2
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$out"
commit=${SWIFTLM_COMMIT:-unknown}
dense=benchmarks/models/qwen3-8b
moe=benchmarks/models/qwen3-30b-a3b
bench() {  # name, then bench_engine arguments
  local name=$1; shift
  python3 benchmarks/bench_engine.py --skip-hf --iters 2 "$@" --json "$out/engine_${name}_h100_$commit.json" \
    > "$out/engine_$name.txt" 2>&1
  grep -E "captured|loaded|tpot|ttft|throughput|startup|Error|error" "$out/engine_$name.txt" | tail -20
}
case "$part" in
  check)
    python3 -m pytest -q tests/test_gemv.py tests/test_fused_kernels.py 2>&1 | tail -4 | tee "$out/kernel_tests.txt"
    python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -6 | tee "$out/gpu_tests.txt"
    ;;
  tpot)
    python3 benchmarks/profile_engine.py --model $dense > "$out/profile_qwen3-8b_h100_$commit.txt" 2>&1
    head -60 "$out/profile_qwen3-8b_h100_$commit.txt"
    bench qwen3-8b --model $dense --skip-throughput
    bench qwen3-8b-fp8 --model $dense --skip-throughput --quantization fp8
    bench qwen3-30b-a3b --model $moe --skip-throughput
    ;;
  sweep)
    python3 benchmarks/bench_gemv.py --fused --ms 1 2 --budget-s 240 --json "$out/gemv_fused_h100_$commit.json" \
      > "$out/gemv_fused_h100_$commit.txt" 2>&1
    sed -n '/==== summary/,$p' "$out/gemv_fused_h100_$commit.txt"
    python3 benchmarks/profile_engine.py --model $dense --quantization fp8 --num-prompts 0 \
      > "$out/profile_qwen3-8b-fp8_h100_$commit.txt" 2>&1
    head -24 "$out/profile_qwen3-8b-fp8_h100_$commit.txt"
    ;;
  throughput)
    bench qwen3-8b --model $dense
    bench qwen3-8b-fp8 --model $dense --skip-throughput --quantization fp8
    bench qwen3-30b-a3b --model $moe --concurrency 1 2 4 8 16 32 64
    ;;
  attention)
    python3 -m pytest -q tests/test_attention_kernels.py 2>&1 | tail -3 | tee "$out/attention_tests.txt"
    python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -4 | tee "$out/gpu_tests.txt"
    python3 benchmarks/profile_engine.py --model $dense > "$out/profile_qwen3-8b_h100_$commit.txt" 2>&1
    grep -E "^bs=1|^prefill [0-9]|^throughput|^mixed" "$out/profile_qwen3-8b_h100_$commit.txt"
    bench qwen3-8b --model $dense --iters 1
    bench qwen3-30b-a3b --model $moe --skip-throughput --iters 1
    ;;
  ttft)
    python3 -m pytest -q tests/test_attention_kernels.py 2>&1 | tail -3 | tee "$out/attention_tests.txt"
    python3 benchmarks/profile_engine.py --model $dense --num-prompts 0 > "$out/profile_qwen3-8b_h100_$commit.txt" 2>&1
    grep -E "^bs=1|^prefill [0-9]" "$out/profile_qwen3-8b_h100_$commit.txt"
    bench qwen3-8b --model $dense --skip-throughput --iters 1
    bench qwen3-8b-fp8 --model $dense --skip-throughput --iters 1 --quantization fp8
    bench qwen3-30b-a3b --model $moe --skip-throughput --iters 1
    ;;
  async)
    python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -4 | tee "$out/gpu_tests.txt"
    python3 -m pytest -q tests/test_async_scheduling.py 2>&1 | tail -4 | tee "$out/async_tests.txt"
    bench qwen3-8b --model $dense --iters 1
    bench qwen3-8b-sync --model $dense --iters 1 --no-async-scheduling
    ;;
  async-more)
    python3 benchmarks/profile_engine.py --model $dense --num-prompts 0 > "$out/profile_qwen3-8b_h100_$commit.txt" 2>&1
    grep -E "^bs=1|^prefill [0-9]" "$out/profile_qwen3-8b_h100_$commit.txt"
    bench qwen3-8b-fp8 --model $dense --skip-throughput --iters 1 --quantization fp8
    bench qwen3-30b-a3b --model $moe --iters 1
    ;;
  rope)
    python3 -m pytest -q tests/test_attention_kernels.py 2>&1 | tail -3 | tee "$out/attention_tests.txt"
    python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -4 | tee "$out/gpu_tests.txt"
    python3 benchmarks/profile_engine.py --model $dense --num-prompts 0 > "$out/profile_qwen3-8b_h100_$commit.txt" 2>&1
    grep -E "^bs=1|^prefill [0-9]" "$out/profile_qwen3-8b_h100_$commit.txt"
    bench qwen3-8b --model $dense --iters 1
    bench qwen3-8b-fp8 --model $dense --skip-throughput --iters 1 --quantization fp8
    bench qwen3-30b-a3b --model $moe --skip-throughput --iters 1
    ;;
  fp8-moe)
    bench qwen3-8b-fp8 --model $dense --iters 1 --quantization fp8
    bench qwen3-30b-a3b --model $moe --iters 1 --concurrency 1 2 4 8 16 32 64
    ;;
  cold)
    for setting in "qwen3-8b" "qwen3-8b-fp8 --quantization fp8" "qwen3-8b-fp8-kvfp8 --quantization fp8 --kv-cache-dtype fp8"
    do
      set -- $setting
      name=$1; shift
      TRITON_CACHE_DIR=$(mktemp -d) python3 benchmarks/bench_engine.py --skip-hf --iters 1 --model $dense "$@" \
        --long-context-batches --json "$out/engine_${name}_coldcache_h100_$commit.json" > "$out/engine_$name.txt" 2>&1
      tail -6 "$out/engine_$name.txt"
    done
    ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
