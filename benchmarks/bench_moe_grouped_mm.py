"""Probe: swiftlm's Triton fused MoE vs torch's CUTLASS grouped GEMM (`torch._grouped_mm`) on Qwen3-30B-A3B
expert shapes, to decide whether prefill-sized MoE should hand its two GEMMs to CUTLASS.

For each token count: swiftlm `fused_moe` on the Triton grouped path (whole layer minus routing), the two
`torch._grouped_mm` GEMMs alone on expert-sorted rows (the compute a CUTLASS path cannot avoid), and the whole
CUTLASS path (`fused_moe(path="cutlass")`: row grouping, GEMM1, SiLU-and-mul, GEMM2, weighted combine). The row
grouping (`group_rows`, one scatter kernel) is also timed alone against its peer, a stable sort plus `index_select`.
The committed `moe_grouped_mm_h100_0cf4167` run predates `moe_cutlass`: it timed the grouped path as "auto"
and a slower PyTorch-op version of the CUTLASS layer.
Times are `triton.testing.do_bench` medians (L2 flushed); TFLOP/s = 2 * T * k * 3 * H * I / time.

    PYTHONPATH=$PWD python benchmarks/bench_moe_grouped_mm.py --tokens 64 512 8000
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from triton.testing import do_bench  # noqa: E402

from swiftlm.kernels import fused_moe as fm  # noqa: E402
from swiftlm.kernels.moe_cutlass import group_rows  # noqa: E402

CONFIG = pathlib.Path(__file__).resolve().parent / "models" / "qwen3-30b-a3b" / "config.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[64, 128, 256, 512, 2048, 8000])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = json.loads(CONFIG.read_text())
    num_experts, top_k = cfg["num_experts"], cfg["num_experts_per_tok"]
    hidden, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    torch.manual_seed(0)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16) * hidden ** -0.5
    w2 = torch.randn(num_experts, hidden, inter, device="cuda", dtype=torch.bfloat16) * inter ** -0.5
    rows = []
    print(f"{'T':>6} {'swiftlm us':>11} {'TF/s':>6} {'cutlass layer us':>17} {'TF/s':>6} {'gemm1 us':>9} "
          f"{'gemm2 us':>9} {'gemms TF/s':>10} {'max rel err':>11} {'group us':>9} {'sort+gather us':>14}")
    for t in args.tokens:
        x = torch.randn(t, hidden, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(t, num_experts, device="cuda")
        weights, ids = fm.route_ref(logits, top_k, True)
        flops = 2 * t * top_k * 3 * hidden * inter
        ours = do_bench(lambda: fm.fused_moe(x, w13, w2, weights, ids, path="grouped"), warmup=5, rep=50) * 1e3
        layer = do_bench(lambda: fm.fused_moe(x, w13, w2, weights, ids, path="cutlass"), warmup=5, rep=50) * 1e3
        a, _, offs = group_rows(x, ids, num_experts)
        grouping = do_bench(lambda: group_rows(x, ids, num_experts), warmup=5, rep=50) * 1e3
        sorting = do_bench(lambda: x.index_select(0, torch.argsort(ids.flatten().int(), stable=True) // top_k),
                           warmup=5, rep=50) * 1e3
        act = torch.randn(t * top_k, inter, device="cuda", dtype=torch.bfloat16)
        g1 = do_bench(lambda: torch._grouped_mm(a, w13.transpose(1, 2), offs=offs), warmup=5, rep=50) * 1e3
        g2 = do_bench(lambda: torch._grouped_mm(act, w2.transpose(1, 2), offs=offs), warmup=5, rep=50) * 1e3
        ref = fm.fused_moe(x, w13, w2, weights, ids, path="grouped").float()
        err = ((fm.fused_moe(x, w13, w2, weights, ids, path="cutlass").float() - ref).norm() / ref.norm()).item()
        row = dict(tokens=t, swiftlm_us=ours, cutlass_layer_us=layer, gemm1_us=g1, gemm2_us=g2, rel_err=err,
                   group_rows_us=grouping, sort_gather_us=sorting,
                   swiftlm_tflops=flops / ours / 1e6, cutlass_layer_tflops=flops / layer / 1e6,
                   gemms_tflops=flops / (g1 + g2) / 1e6)
        rows.append(row)
        print(f"{t:>6} {ours:>11.1f} {row['swiftlm_tflops']:>6.0f} {layer:>17.1f} {row['cutlass_layer_tflops']:>6.0f} "
              f"{g1:>9.1f} {g2:>9.1f} {row['gemms_tflops']:>10.0f} {err:>11.2e} {grouping:>9.1f} {sorting:>14.1f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                                           rows=rows), indent=1))


if __name__ == "__main__":
    main()
