#!/usr/bin/env bash
# On the GPU machine: the cross-kernel weight prefetch (SWIFTLM_PREFETCH_MB) against no prefetch and no PDL.
#   ab:     bench_prefetch.py (decode-graph replays per setting, one engine per model) for Qwen3-8B bf16 at batch
#           1 and 32, Qwen3-8B FP8 and Qwen3-30B-A3B bf16 at batch 1;
#   early:  early release without prefetch against both off and a 4 MB budget (Qwen3-8B FP8, Qwen3-30B-A3B, batch
#           1), then full bench_engine runs with the FP8 KV cache and prefetch off: Qwen3-8B FP8 and Qwen3-30B-A3B;
#   awq:    the same for Qwen2.5-Coder-32B-Instruct-AWQ at batch 1, then the GEMV / attention / MoE / AWQ kernel
#           tests and the GPU engine tests on CUDA.
# Usage: SWIFTLM_COMMIT=<sha> bash benchmarks/device_prefetch.sh ab|awq OUT_DIR
set -uo pipefail
part=$1; out=$2
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$out"
commit=${SWIFTLM_COMMIT:-unknown}
ab() {  # name, then bench_prefetch arguments
  local name=$1; shift
  python3 benchmarks/bench_prefetch.py --budgets nopdl 0 8 16 32 "$@" --json "$out/prefetch_${name}_h100_$commit.json" \
    > "$out/prefetch_$name.txt" 2>&1
  grep -E "setting|Error|error" "$out/prefetch_$name.txt" | tail -12
}
case "$part" in
  ab)
    ab qwen3-8b --model benchmarks/models/qwen3-8b --batch-sizes 1 32
    ab qwen3-8b-fp8 --model benchmarks/models/qwen3-8b --quantization fp8
    ab qwen3-30b-a3b --model benchmarks/models/qwen3-30b-a3b
    ;;
  early)
    ab qwen3-8b-fp8_early --model benchmarks/models/qwen3-8b --quantization fp8 --budgets 0 early 4
    ab qwen3-30b-a3b_early --model benchmarks/models/qwen3-30b-a3b --budgets 0 early 4
    for args in "qwen3-8b-fp8-kvfp8 --quantization fp8 --model benchmarks/models/qwen3-8b" \
                "qwen3-30b-a3b-kvfp8 --model benchmarks/models/qwen3-30b-a3b"; do
      set -- $args; name=$1; shift
      SWIFTLM_PREFETCH_MB=0 python3 benchmarks/bench_engine.py --skip-hf --iters 1 --kv-cache-dtype fp8 "$@" \
        --json "$out/engine_${name}_h100_$commit.json" > "$out/engine_$name.txt" 2>&1
      grep -E "tpot|ttft|throughput|startup|Error|error" "$out/engine_$name.txt" | tail -8
    done
    ;;
  awq)
    ab qwen2.5-coder-32b-awq --model benchmarks/models/qwen2.5-coder-32b-instruct-awq
    python3 -m pytest -q tests/test_gemv.py tests/test_attention_kernels.py tests/test_fused_moe.py tests/test_quant_kernels.py \
      2>&1 | tail -4 | tee "$out/kernel_tests_h100_$commit.txt"
    python3 -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tail -4 | tee "$out/gpu_tests_h100_$commit.txt"
    ;;
  *)
    echo "unknown part $part" >&2; exit 2
    ;;
esac
