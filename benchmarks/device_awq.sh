#!/usr/bin/env bash
# On the GPU machine: the AWQ W4A16 decode work (issue 5), one part per call so each stays under the 10-minute limit.
#   gemv:   the AWQ kernel tests on CUDA, the decode-GEMV launch-config sweep on the Qwen2.5-32B shapes (M = 1 over
#           the main grid, M = 2, 4, 8 over the small grid, each against the Triton GEMM), then bench_engine for
#           Qwen2.5-Coder-32B-Instruct-AWQ (random weights) without the throughput run: batch-1 TPOT, TTFT 512 /
#           8000, start-up;
#   engine: that bench_engine run alone.
# Usage: SWIFTLM_COMMIT=<sha> bash benchmarks/device_awq.sh gemv|engine OUT_DIR
set -uo pipefail
part=$1; out=$2
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
mkdir -p "$out"
model=benchmarks/models/qwen2.5-coder-32b-instruct-awq
commit=${SWIFTLM_COMMIT:-unknown}
engine() {
  python3 benchmarks/bench_engine.py --model $model --skip-hf --iters 1 --skip-throughput \
    --json "$out/engine_qwen2.5-coder-32b-awq_h100_$commit.json" > "$out/engine_awq.txt" 2>&1
  grep -E "captured|loaded|tpot|ttft|startup|Error|error" "$out/engine_awq.txt" | tail -20
}
case "$part" in
  gemv)
    python3 -m pytest -q tests/test_quant_kernels.py -k awq 2>&1 | tail -4 | tee "$out/awq_tests.txt"
    python3 benchmarks/bench_awq_gemv.py --ms 1 --grid main --json "$out/awq_gemv_h100_$commit.json" 2>&1 \
      | tee "$out/awq_gemv_h100_$commit.txt" | tail -8
    python3 benchmarks/bench_awq_gemv.py --ms 2 4 8 --grid small --json "$out/awq_gemv_m248_h100_$commit.json" \
      2>&1 | tee "$out/awq_gemv_m248_h100_$commit.txt" | tail -14
    engine
    ;;
  engine)
    engine
    ;;
  *)
    echo "unknown part $part" >&2; exit 2
    ;;
esac
