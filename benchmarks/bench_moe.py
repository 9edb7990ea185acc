"""Fused MoE on the GPU: correctness on Qwen3-MoE shapes, then MoE layer time (router gate + routing + experts,
i.e. `gate_route` + `fused_moe`) per token count.

Default shapes are Qwen3-30B-A3B (E=128, top-8, H=2048, I=768); `--config` takes another config.json (e.g.
Qwen3-235B-A22B: H=4096, I=1536). For T = 1, 8, 16, 64, 512 tokens, bf16 and FP8 PTPC experts:
  * swiftlm, auto path (and the other paths that apply), timed in a CUDA graph as decode runs it, over 32
    different router gates captured back to back so consecutive calls hit different experts (L2 holds no weights
    for the next call), and eagerly with `triton.testing.do_bench` (median, L2 flushed between calls);
  * a PyTorch loop over the active experts (bf16 F.linear per expert, as HF runs it, from given logits), eager;
  * achieved bandwidth = bytes of the active experts' weights / graph time (vs --peak-gbps, 3000 for H100 SXM)
    and TFLOP/s = 2 * T * k * 3 * H * I / time.
`--sweep` also times tile variants per GEMM and prints the best, to retune the heuristics in fused_moe.py
(about 30 compiles per token count and dtype: sweep a few token counts per run).

    PYTHONPATH=$PWD python benchmarks/bench_moe.py [--config PATH] [--tokens 1 8 64 512] [--json PATH]
    PYTHONPATH=$PWD python benchmarks/bench_moe.py --sweep --tokens 1 8 --dtypes bf16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from graph_timer import graph_ms  # noqa: E402
from swiftlm.kernels import fused_moe as fm  # noqa: E402
from swiftlm.kernels.fused_moe import MoeTileConfig  # noqa: E402
from swiftlm.kernels.quant import quantize_weight_fp8_ref  # noqa: E402

DEVICE = "cuda"
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent / "models" / "qwen3-30b-a3b" / "config.json"
NUM_ROUTINGS = 32
REL_TOL = {"bf16": 2e-2, "fp8": 3e-2}
GEMV_BENCH_MAX_TOKENS = 16  # the GEMV path is also timed up to here, past where auto dispatch stops using it


def moe_shapes(path: pathlib.Path) -> dict:
    cfg = json.loads(path.read_text())
    return dict(num_experts=cfg.get("num_experts", cfg.get("num_local_experts")), top_k=cfg["num_experts_per_tok"],
                hidden=cfg["hidden_size"], inter=cfg["moe_intermediate_size"],
                renormalize=bool(cfg.get("norm_topk_prob", False)))


class Experts:
    """Random expert weights in bf16 and their FP8 PTPC quantization (same values up to e4m3 rounding)."""

    def __init__(self, shapes: dict, gen: torch.Generator) -> None:
        e, h, i = shapes["num_experts"], shapes["hidden"], shapes["inter"]
        self.w13 = (torch.randn(e, 2 * i, h, device=DEVICE, generator=gen) / math.sqrt(h)).to(torch.bfloat16)
        self.w2 = (torch.randn(e, h, i, device=DEVICE, generator=gen) / math.sqrt(i)).to(torch.bfloat16)
        self.q13, self.s13 = self._quantize(self.w13)
        self.q2, self.s2 = self._quantize(self.w2)

    @staticmethod
    def _quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [quantize_weight_fp8_ref(w[e]) for e in range(w.shape[0])]  # per expert: bounded fp32 temporaries
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])

    def args(self, dtype: str) -> tuple:
        return (self.w13, self.w2, None, None) if dtype == "bf16" else (self.q13, self.q2, self.s13, self.s2)

    def bytes_per_expert(self, dtype: str) -> int:
        per = self.w13[0].numel() + self.w2[0].numel()
        return per * 2 if dtype == "bf16" else per + 4 * (self.w13.shape[1] + self.w2.shape[1])


def torch_loop(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, logits: torch.Tensor, top_k: int,
               renormalize: bool) -> torch.Tensor:
    """Baseline as HF transformers runs it: softmax top-k, then bf16 linears per active expert (host syncs)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for expert in torch.unique(ids).tolist():
        tokens, slots = torch.where(ids == expert)
        gate, up = F.linear(x[tokens], w13[expert]).split(inter, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert]) * weights[tokens, slots, None].to(x.dtype)
        out.index_add_(0, tokens, y)
    return out


def eager_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))


def paths_for(tokens: int, shapes: dict, dtype: str) -> list[str]:
    """Every path that takes this many tokens of this dtype, the one auto dispatch picks first (on sm90+)."""
    pairs = tokens * shapes["top_k"]
    paths = ["low_latency", "grouped"] if pairs <= fm.LOW_LATENCY_MAX_PAIRS else ["grouped"]
    if pairs > fm.LOW_LATENCY_MAX_PAIRS and dtype == "bf16":
        cutlass_first = pairs >= fm.CUTLASS_MIN_PAIRS_PER_EXPERT * shapes["num_experts"]
        paths = ["cutlass", "grouped"] if cutlass_first else ["grouped", "cutlass"]
    gemv = ["gemv"] if tokens <= GEMV_BENCH_MAX_TOKENS else []
    return gemv + paths if tokens <= fm.GEMV_MAX_TOKENS else paths + gemv


def check(experts: Experts, shapes: dict, tokens: int, dtype: str, gen: torch.Generator) -> list[dict]:
    """Every applicable path against fused_moe_ref (fp32 math) on one random routing."""
    x = torch.randn(tokens, shapes["hidden"], device=DEVICE, generator=gen).to(torch.bfloat16)
    logits = torch.randn(tokens, shapes["num_experts"], device=DEVICE, generator=gen)
    weights, ids = fm.route(logits, shapes["top_k"], shapes["renormalize"])
    w13, w2, s13, s2 = experts.args(dtype)
    rows = []
    for path in paths_for(tokens, shapes, dtype):
        ref = fm.fused_moe_ref(x, w13, w2, weights, ids, s13, s2, quantize_activations=path != "gemv").float()
        out = fm.fused_moe(x, w13, w2, weights, ids, s13, s2, path=path).float()
        rel = ((out - ref).norm() / ref.norm()).item()
        rows.append(dict(tokens=tokens, dtype=dtype, path=path, rel_err=rel, max_abs_err=(out - ref).abs().max().item(),
                         ok=rel < REL_TOL[dtype]))
    return rows


def bench(experts: Experts, shapes: dict, tokens: int, dtype: str, peak_gbps: float,
          gen: torch.Generator) -> list[dict]:
    e, k, h, i = shapes["num_experts"], shapes["top_k"], shapes["hidden"], shapes["inter"]
    renorm = shapes["renormalize"]
    x = torch.randn(tokens, h, device=DEVICE, generator=gen).to(torch.bfloat16)
    # One router gate per captured call (0.5 MB each for 30B), so consecutive calls route to different experts.
    gates = [(torch.randn(e, h, device=DEVICE, generator=gen) / math.sqrt(h)).to(torch.bfloat16)
             for _ in range(NUM_ROUTINGS)]
    routings = [F.linear(x, g) for g in gates]
    active = statistics.mean(torch.unique(fm.route_ref(r, k, renorm)[1]).numel() for r in routings)
    weight_bytes = active * experts.bytes_per_expert(dtype)
    flops = 2 * tokens * k * 3 * h * i
    w13, w2, s13, s2 = experts.args(dtype)
    baseline = None
    if dtype == "bf16":
        baseline = eager_ms(lambda: torch_loop(x, experts.w13, experts.w2, routings[0], k, renorm))

    def layer(gate: torch.Tensor, path: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            weights, ids = fm.gate_route(x, gate, k, renorm)
            return fm.fused_moe(x, w13, w2, weights, ids, s13, s2, path=path)
        return run

    rows = []
    auto = paths_for(tokens, shapes, dtype)[0]
    for path in paths_for(tokens, shapes, dtype):
        g = graph_ms([layer(gate, path) for gate in gates])
        eager = eager_ms(layer(gates[0], path))
        rows.append(dict(tokens=tokens, pairs=tokens * k, dtype=dtype, path=path, auto=path == auto,
                         active_experts=active, graph_us=g * 1e3, eager_us=eager * 1e3,
                         torch_loop_us=None if baseline is None else baseline * 1e3,
                         speedup_vs_loop=None if baseline is None else baseline / g,
                         weight_gbps=weight_bytes / (g * 1e-3) / 1e9,
                         weight_bw_frac=weight_bytes / (g * 1e-3) / 1e9 / peak_gbps,
                         tflops=flops / (g * 1e-3) / 1e12))
    torch.cuda.empty_cache()
    return rows


def sweep(experts: Experts, shapes: dict, tokens: int, dtype: str, gen: torch.Generator,
          paths: list[str]) -> list[dict]:
    """Time tile variants for one GEMM at a time (the other keeps its heuristic tiles); best first per GEMM."""
    e, k, h, i = shapes["num_experts"], shapes["top_k"], shapes["hidden"], shapes["inter"]
    x = torch.randn(tokens, h, device=DEVICE, generator=gen).to(torch.bfloat16)
    routings = [torch.randn(tokens, e, device=DEVICE, generator=gen) for _ in range(8)]
    routed = [fm.route(r, k, shapes["renormalize"]) for r in routings]
    w13, w2, s13, s2 = experts.args(dtype)
    pairs = tokens * k
    rows = []
    for path in [p for p in paths_for(tokens, shapes, dtype) if p in paths]:
        if path == "gemv":
            base = fm.gemv_configs(h, i, w13.dtype)
            per_warp = 512 // w13.element_size()
            variants = [fm.MoeGemvConfig(bn, bk, w) for bn in (2, 4, 8, 16) for bk, w in
                        ((per_warp, 4), (per_warp, 1), (per_warp * 4, 4), (per_warp * 4, 8))]
        elif path == "low_latency":
            base = (fm.low_latency_config(pairs, e, i, h, True, w13.dtype),
                    fm.low_latency_config(pairs, e, h, i, False, w2.dtype))
            variants = [MoeTileConfig(16, bn, bk, 4, st) for bn in (16, 32, 64, 128) for bk in (128, 256)
                        for st in (3, 4)]
        else:
            base = (fm.grouped_config(pairs, e, i, h, True, w13.dtype),
                    fm.grouped_config(pairs, e, h, i, False, w2.dtype))
            bms = (64, 128) if pairs / e > 96 else (base[0].block_m,)  # prefill-sized: row tiles vary too
            variants = [MoeTileConfig(bm, bn, bk, w, st, 8) for bm in bms for bn in (64, 128) for bk in (64, 128)
                        for w, st in ((4, 3), (4, 4), (8, 3))]
        for gemm in (0, 1):
            results = []
            for cfg in variants:
                other = base[1 - gemm]
                if path == "grouped":  # both grouped GEMMs read one expert-aligned layout: one block_m
                    other = dataclasses.replace(other, block_m=cfg.block_m)
                configs = (cfg, other) if gemm == 0 else (other, cfg)
                calls = [lambda w=w_, d=d_, c=configs, p=path: fm.fused_moe(x, w13, w2, w, d, s13, s2, path=p,
                                                                             configs=c)
                         for w_, d_ in routed]
                try:
                    ms = graph_ms(calls, reps=10)
                except OutOfResources:
                    continue
                results.append(dict(tokens=tokens, dtype=dtype, path=path, gemm=gemm + 1,
                                    config=dataclasses.asdict(cfg), heuristic=dataclasses.asdict(base[gemm]),
                                    us=ms * 1e3))
            results.sort(key=lambda r: r["us"])
            rows += results
            if results:
                best = results[0]
                print(f"  sweep T={tokens} {dtype} {path} GEMM{gemm + 1}: best {best['config']} {best['us']:.1f} us "
                      f"(heuristic {best['heuristic']})", flush=True)
    return rows


def fmt(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"


def print_table(rows: list[dict], checks: list[dict], peak_gbps: float) -> None:
    print(f"\n{'dtype':5} {'T':>4} {'pairs':>5} {'path':12} {'act.E':>5} {'graph us':>9} {'eager us':>9} "
          f"{'loop us':>9} {'speedup':>7} {'GB/s':>6} {'%peak':>5} {'TFLOP/s':>7}")
    for r in rows:
        mark = "*" if r["auto"] else " "
        print(f"{r['dtype']:5} {r['tokens']:>4} {r['pairs']:>5} {r['path']:11}{mark} {r['active_experts']:>5.1f} "
              f"{r['graph_us']:>9.1f} {r['eager_us']:>9.1f} {fmt(r['torch_loop_us'], 9)} "
              f"{fmt(r['speedup_vs_loop'], 6)}x {r['weight_gbps']:>6.0f} {100 * r['weight_bw_frac']:>4.0f}% "
              f"{r['tflops']:>7.1f}")
    print(f"(* = path the auto dispatch picks; GB/s = active experts' weight bytes / graph time, peak {peak_gbps:.0f})")
    bad = [c for c in checks if not c["ok"]]
    print(f"correctness: {len(checks) - len(bad)}/{len(checks)} within tolerance; worst rel err "
          f"{max(c['rel_err'] for c in checks):.2e}" + ("" if not bad else f"; FAILED {bad}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=pathlib.Path, default=DEFAULT_CONFIG, help="Qwen3-MoE config.json")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 64, 512])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--peak-gbps", type=float, default=3000.0)
    parser.add_argument("--json", type=pathlib.Path, help="write all figures here")
    parser.add_argument("--sweep", action="store_true", help="also time tile variants per GEMM")
    parser.add_argument("--sweep-paths", nargs="+", default=["gemv", "low_latency", "grouped"],
                        choices=["gemv", "low_latency", "grouped"], help="paths whose tiles --sweep varies")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    shapes = moe_shapes(args.config)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    experts = Experts(shapes, gen)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  {shapes}",
          flush=True)

    checks = [c for dtype in args.dtypes for t in args.tokens for c in check(experts, shapes, t, dtype, gen)]
    for c in checks:
        print(f"check T={c['tokens']} {c['dtype']} {c['path']}: rel err {c['rel_err']:.2e} "
              f"max abs {c['max_abs_err']:.2e} {'ok' if c['ok'] else 'FAIL'}", flush=True)
    rows, sweeps = [], []
    for dtype in args.dtypes:
        for t in args.tokens:
            rows += bench(experts, shapes, t, dtype, args.peak_gbps, gen)
            print(f"bench T={t} {dtype} done", flush=True)
            if args.sweep:
                sweeps += sweep(experts, shapes, t, dtype, gen, args.sweep_paths)

    print_table(rows, checks, args.peak_gbps)
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    shapes=shapes, peak_gbps=args.peak_gbps, num_routings=NUM_ROUTINGS)
        args.json.write_text(json.dumps(dict(meta=meta, checks=checks, results=rows, sweep=sweeps), indent=2))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
