"""AWQ W4A16 decode GEMV sweep on the GPU: `awq_gemv_triton` launch configs vs fp16 cuBLAS, Qwen2.5-32B shapes.

For each shape and M, every config in the grid is checked against `awq_gemm_ref` (relative Frobenius error < 1e-2)
and timed; the table shows the shipped choice (`AWQ_GEMV_SHAPE_CONFIGS`, else M's `AWQ_GEMV_CONFIGS`), the best
config, cuBLAS on the dequantized fp16 weight and the dequantizing Triton GEMM (`awq_gemm_triton`, the path for M
above the GEMV's range). Timing: a CUDA graph of 20 back-to-back calls cycling over weight copies (>= 256 MB in
all, so L2 never holds the next call's weight), median of replays. GB/s counts qweight + qzeros + scales bytes.

    PYTHONPATH=$PWD python benchmarks/bench_awq_gemv.py [--ms 1 4 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import torch

from graph_timer import graph_ms  # benchmarks/ is on sys.path when this script runs
from swiftlm.kernels import awq

SHAPES = {"qkv": (7168, 5120), "o": (5120, 5120), "gate_up": (55296, 5120), "down": (5120, 27648)}  # (N, K)
GROUP = 128
GRIDS = {
    # tiles x pipeline depth x warps at the default flush interval
    "main": [dict(BLOCK_P=p, BLOCK_K=k, NUM_STAGES=s, num_warps=w, FLUSH=4)
             for p, k, s, w in itertools.product((16, 32, 64), (16, 32), (2, 3, 4), (4, 8))],
    # small tiles for M > 1 (a thread keeps 4 * M partial sums per word of its tile)
    "small": [dict(BLOCK_P=p, BLOCK_K=k, num_warps=w) for p, k, w in itertools.product((8, 16, 32), (8, 16), (4, 8))],
    # K splits (0: the launch heuristic) at the two best M = 1 tiles of 9a4ae88
    "split": [dict(BLOCK_P=p, BLOCK_K=k, split_k=s) for (p, k), s in itertools.product(
        ((64, 16), (32, 32)), (0, 2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 54))],
    # deeper pipelines and longer K steps (more bytes in flight per SM) at several K splits
    "deep": [dict(BLOCK_P=p, BLOCK_K=k, NUM_STAGES=st, split_k=sp) for p, k, st, sp in itertools.product(
        (32, 64), (16, 32), (3, 4, 5), (0, 8, 12, 16, 24, 40))],
    # groups between the fp32 reductions of the fp16 partial sums, at two tile shapes
    "flush": [dict(BLOCK_P=p, BLOCK_K=k, FLUSH=f) for p, k, f in itertools.product((32,), (16, 32), (1, 2, 4, 8))],
}
CALLS = 20


def graph_us(fn, copies: int) -> float:
    """Microseconds per call of fn(i) in a graph of CALLS calls cycling i over the weight copies."""
    return 1e3 * graph_ms([lambda i=i: fn(i % copies) for i in range(CALLS)], reps=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--grid", choices=sorted(GRIDS), default="main", help="launch configs to try")
    ap.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(f"{torch.cuda.get_device_name()}; defaults {awq.AWQ_GEMV_CONFIGS}")
    print(f"{'shape':8} {'M':>2} | {'shipped us':>10} {'GB/s':>5} | {'best us':>7} {'GB/s':>5} {'best config':40} | "
          f"{'fp16 cuBLAS us':>14} {'speedup':>7} | {'gemm us':>9}")
    for name in args.shapes:
        n, k = SHAPES[name]
        nbytes = k * n // 2 + (k // GROUP) * n // 2 + (k // GROUP) * n * 2
        copies = max(2, -(-(256 << 20) // nbytes))
        qw = [torch.randint(-2**31, 2**31 - 1, (k, n // 8), device="cuda", generator=gen, dtype=torch.int32)
              for _ in range(copies)]
        qz = [torch.randint(-2**31, 2**31 - 1, (k // GROUP, n // 8), device="cuda", generator=gen,
                            dtype=torch.int32) for _ in range(copies)]
        sc = [(torch.rand(k // GROUP, n, device="cuda", generator=gen) * 0.01).half() for _ in range(copies)]
        w16 = awq.awq_dequantize(qw[0], qz[0], sc[0], GROUP, torch.float16)
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", generator=gen).half()
            ref = awq.awq_gemm_ref(x, qw[0], qz[0], sc[0], GROUP).float()
            default_cfg = awq.AWQ_GEMV_CONFIGS[1 << (m - 1).bit_length()]
            grid = [None] + [dict(default_cfg, **c) for c in GRIDS[args.grid]]  # None: the shipped choice
            results = []
            for cfg in grid:
                launch = None if cfg is None else dict(cfg)
                split = launch.pop("split_k", None) if launch else None
                try:
                    out = awq.awq_gemv_triton(x, qw[0], qz[0], sc[0], GROUP, config=launch, split_k=split).float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    if err > 1e-2:
                        results.append(dict(config=cfg or "shipped", error=f"rel err {err:.2e}"))
                        continue
                    us = graph_us(lambda i: awq.awq_gemv_triton(x, qw[i], qz[i], sc[i], GROUP, config=launch,
                                                                split_k=split), copies)
                    results.append(dict(config=cfg or "shipped", us=us, gbps=nbytes / us / 1e3, rel_err=err))
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for a large tile
                    results.append(dict(config=cfg or "shipped", error=f"{type(exc).__name__}: {str(exc)[:120]}"))
            timed = [r for r in results if "us" in r]
            best = min(timed, key=lambda r: r["us"])
            default = results[0]
            gemm = graph_us(lambda i: awq.awq_gemm_triton(x, qw[i], qz[i], sc[i], GROUP), copies)
            w16s = [w16] + [w16.clone() for _ in range(max(1, (256 << 20) // w16.numel() // 2) - 1)]
            cublas = graph_us(lambda i: x @ w16s[i], len(w16s))
            rows.append(dict(shape=name, n=n, k=k, m=m, bytes=nbytes, default=default, best=best, cublas_us=cublas,
                             triton_gemm_us=gemm,
                             all=results))
            print(f"{name:8} {m:>2} | {default.get('us', float('nan')):10.1f} {default.get('gbps', 0):5.0f} | "
                  f"{best['us']:7.1f} {best['gbps']:5.0f} {str(best['config']):40} | {cublas:14.1f} "
                  f"{cublas / best['us']:7.2f}x | {gemm:9.1f}", flush=True)
            del w16s
        del qw, qz, sc, w16
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           git_commit=os.environ.get("SWIFTLM_COMMIT", "unknown"), command=" ".join(sys.argv),
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           group=GROUP, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
