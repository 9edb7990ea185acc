"""Decode GEMV sweep: swiftlm.kernels.gemv config variants vs cuBLAS (bf16) and the FP8 baselines, M = 1..16.

Shapes (N, K): Qwen3-8B qkv, o, gate_up, down and LM head (bf16 only); Qwen3-30B-A3B attention qkv, o. For every
shape, M in {1, 2, 4, 8, 16} and weight dtype (bf16; fp8 e4m3 with one fp32 scale per output row, W8A16):
  * each gemv variant (kernel fma|dot, block_n, block_k, split_k, num_warps, num_stages) is first checked against
    gemv_ref (fp32 math): relative Frobenius error < 1e-2 and bitwise-equal output on a second call (the in-kernel
    split-K fix-up must be deterministic and reset its counters). Failing or uncompilable variants are reported,
    never timed. The current config (`gemv_config`: table entry or default heuristic) is timed too;
  * baselines: bf16 -> cuBLAS (F.linear). fp8 -> torch._scaled_mm with row-wise scales on pre-quantized x
    ("scaled_mm"), the same with per-token quantization of x included ("quant+mm"), and swiftlm's current
    fp8_linear path (quantization + Triton small-M kernel, "sl_fp8"); the bf16 cuBLAS time of the shape is shown too.
Timing: a CUDA graph of >= 20 back-to-back calls, rotating over >= 4 copies of the weight (>= 256 MB in all, so
L2 (50 MB) never holds the next call's weight), replayed; median per call. GB/s = weight bytes (+ fp32 scales) /
time, shown against --peak-gbps (3000, H100 SXM). Kernels compile first in parallel worker processes (Triton disk
cache); the sweep then stops adding variants once --budget-s is spent (remaining cases: current config + baselines).
--fused times the fused-input modes instead, where a shape has one: "norm" (qkv, gate_up: x + residual, RMSNorm
folded into the load, new residual written) and "silu" (down: SiLU(gate) * up of a [M, 2K] input); the baseline is
then the unfused sequence (the norm or activation kernel, then the plain GEMV with its current config), and the
literal printed is FUSED_GEMV_CONFIGS.
Output: one line per (shape, M, dtype) as it goes, then the summary table, then a paste-ready GEMV_CONFIGS literal
for swiftlm/kernels/gemv.py. --json PATH writes every measurement.

    PYTHONPATH=$PWD python benchmarks/bench_gemv.py [--json out.json] [--ms 1 8] [--shapes 8b.o 8b.down] [--quick]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

from swiftlm.kernels import gemv as gk  # noqa: E402
from swiftlm.kernels import quant  # noqa: E402
from swiftlm.kernels.gemv import GemvConfig  # noqa: E402

DEVICE = "cuda"
SHAPES: dict[str, tuple[int, int, tuple[str, ...]]] = {  # name: (N, K, weight dtypes)
    "8b.qkv": (6144, 4096, ("bf16", "fp8")),
    "8b.o": (4096, 4096, ("bf16", "fp8")),
    "8b.gate_up": (24576, 4096, ("bf16", "fp8")),
    "8b.down": (4096, 12288, ("bf16", "fp8")),
    "8b.lm_head": (151936, 4096, ("bf16",)),
    "30b.qkv": (5120, 2048, ("bf16", "fp8")),
    "30b.o": (2048, 4096, ("bf16", "fp8")),
}
FUSED_MODES = {"8b.qkv": "norm", "8b.gate_up": "norm", "8b.down": "silu", "30b.qkv": "norm"}
MS = (1, 2, 4, 8, 16)
ELEMENT = {"bf16": 2, "fp8": 1}
REL_TOL = 1e-2  # vs fp32 math; bf16 output rounding alone is ~3e-3
ROTATE_BYTES = 256 << 20
MIN_CALLS = 20
SMS = 132  # H100 SXM; split candidates aim at multiples of it

# fma: (block_n, bytes of a weight row per tile, num_warps, num_stages). Tiles with 512 * num_warps bytes per row
# put the warps side by side along K (each x element loaded once, straight into registers); the last layout stacks
# warps along N instead (x through shared memory each iteration) as a control.
FMA_LAYOUTS = [(2, 2048, 4, 1), (4, 2048, 4, 1), (8, 2048, 4, 1), (16, 2048, 4, 1), (4, 2048, 4, 3),
               (8, 2048, 4, 3), (8, 1024, 2, 1), (16, 1024, 2, 1), (4, 4096, 8, 1), (8, 4096, 8, 1),
               (16, 512, 4, 1)]
# dot: (block_n, bytes of a weight row per tile, num_warps, num_stages); M is padded to 16 on the MMA's narrow side.
DOT_LAYOUTS = [(16, 512, 4, 4), (16, 1024, 4, 3), (32, 512, 4, 4), (32, 1024, 4, 3), (64, 256, 4, 4),
               (64, 256, 4, 6), (64, 512, 4, 3), (64, 128, 4, 8), (128, 256, 8, 4), (128, 128, 4, 6)]
QUICK_FMA = FMA_LAYOUTS[1:3] + FMA_LAYOUTS[5:6]
QUICK_DOT = DOT_LAYOUTS[2:3] + DOT_LAYOUTS[4:5]
MAX_FMA_REGS = 300  # rough per-thread estimate (w tile in fp32 + x rows + accumulators); ~0.7x of ptxas' count
MAX_DOT_SMEM = 200 << 10


# ----------------------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------------------

def fma_regs(block_n: int, row_bytes: int, warps: int, element: int, bm: int) -> float:
    """Per-thread register estimate of the fma kernel (see MAX_FMA_REGS)."""
    vec = 16 // element
    block_k = row_bytes // element
    warps_k = max(1, min(warps, block_k // (32 * vec)))
    rows = max(1, block_n // (warps // warps_k))
    per_thread = block_n * block_k / (32 * warps)  # weight elements per thread per iteration
    return per_thread + bm * per_thread / rows + bm * per_thread / vec + 24


def layouts(kernel: str, dtype: str, k: int, bm: int, quick: bool) -> list[tuple[int, int, int, int]]:
    """Layouts worth compiling for this kernel, weight dtype, K and M bucket (obviously bad ones pruned)."""
    element = ELEMENT[dtype]
    keep = []
    for block_n, row_bytes, warps, stages in (QUICK_FMA if quick else FMA_LAYOUTS) if kernel == "fma" else \
            (QUICK_DOT if quick else DOT_LAYOUTS):
        block_k = row_bytes // element
        if block_k > k or block_n * element < 2 * bm:  # x rows would outweigh the weight tile in L1/L2 traffic
            continue
        if kernel == "fma" and fma_regs(block_n, row_bytes, warps, element, bm) > MAX_FMA_REGS:
            continue
        if kernel == "dot" and stages * (block_n * row_bytes + block_k * 16 * 2) > MAX_DOT_SMEM:
            continue
        keep.append((block_n, block_k, warps, stages))
    return keep


def splits(n: int, k: int, block_n: int, block_k: int) -> list[int]:
    """Distinct effective K splits whose program counts land nearest 1, 2, 4, 8 and 16 per SM (always 1)."""
    tiles = math.ceil(n / block_n)
    effective = {}
    for s in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        per = math.ceil(math.ceil(k / s) / block_k) * block_k
        eff = math.ceil(k / per)
        effective.setdefault(eff, tiles * eff)
    chosen = {1}
    for target in (1, 2, 4, 8, 16):
        best = min(effective, key=lambda s: abs(math.log(effective[s] / (target * SMS))))
        chosen.add(best)
    return sorted(chosen)


def variants(n: int, k: int, m: int, dtype: str, quick: bool, mode: str = "plain") -> list[GemvConfig]:
    out = []
    for kernel in ("fma", "dot"):
        for block_n, block_k, warps, stages in layouts(kernel, dtype, k, m, quick):
            ks = [1] if mode == "norm" else splits(n, k, block_n, block_k)  # the norm needs whole rows
            out += [GemvConfig(kernel, block_n, block_k, s, warps, stages) for s in ks]
    return out


def label(cfg: GemvConfig) -> str:
    return f"{cfg.kernel} n{cfg.block_n} k{cfg.block_k} s{cfg.split_k} w{cfg.num_warps} st{cfg.num_stages}"


def current_config(n: int, k: int, m: int, dtype: str, mode: str = "plain") -> GemvConfig:
    """What `gemv` runs today without a config (table entry or default heuristic), split made explicit."""
    cfg = gk.gemv_config(m, n, k, quant.FP8_DTYPE if dtype == "fp8" else torch.bfloat16, mode)
    if mode == "norm":
        return dataclasses.replace(cfg, split_k=1)
    if cfg.split_k == 0:
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        cfg = dataclasses.replace(cfg, split_k=gk.auto_split_k(math.ceil(n / cfg.block_n), k, cfg.block_k, sms))
    return cfg


# ----------------------------------------------------------------------------------------------------------
# Parallel precompilation (fills Triton's disk cache; the main process then only loads binaries)
# ----------------------------------------------------------------------------------------------------------

def fused_inputs(m: int, k: int, mode: str, gen: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
    """x and the extra gemv arguments of an input mode (random if gen is given, else zeros)."""
    def make(*shape: int) -> torch.Tensor:
        if gen is None:
            return torch.zeros(*shape, dtype=torch.bfloat16, device=DEVICE)
        return torch.randn(*shape, device=DEVICE, generator=gen).to(torch.bfloat16)
    if mode == "silu":
        return make(m, 2 * k), dict(silu_mul=True)
    x = make(m, k)
    if mode == "norm":
        gamma = make(k).abs() + 0.5
        return x, dict(rms_weight=gamma, rms_eps=1e-6, residual=make(m, k), residual_out=torch.empty_like(x))
    return x, {}


def mode_ref(x: torch.Tensor, kw: dict, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """fp32 reference output of an input mode: the unfused norm / activation, then gemv_ref."""
    from swiftlm.kernels.activation import silu_and_mul_ref
    from swiftlm.kernels.fused_norm import fused_add_rms_norm_ref
    if kw.get("silu_mul"):
        x = silu_and_mul_ref(x)
    elif "rms_weight" in kw:
        x = fused_add_rms_norm_ref(x, kw["residual"], kw["rms_weight"], kw["rms_eps"])[0]
    return gk.gemv_ref(x, w, scale, out_dtype=torch.float32)


def compile_job(job: tuple[str, str, int, int, int, int, int, str]) -> tuple[tuple, str | None]:
    """Compile (and run once on a tiny problem with the same specialization) one kernel variant."""
    kernel, dtype, bm, block_n, block_k, warps, stages, mode = job
    try:
        n, k = max(32, 2 * block_n), 2 * block_k  # multiples of 16 like every benchmark shape; K % block_k == 0
        x, kw = fused_inputs(bm, k, mode)
        w = torch.zeros(n, k, dtype=torch.bfloat16, device=DEVICE)
        scale = None
        if dtype == "fp8":
            w, scale = w.to(quant.FP8_DTYPE), torch.ones(n, 1, device=DEVICE)
        gk.gemv(x, w, scale, config=GemvConfig(kernel, block_n, block_k, 1, warps, stages), **kw)
        torch.cuda.synchronize()
        return job, None
    except Exception as exc:  # noqa: BLE001 - reported; the main process retries all but OutOfResources
        return job, f"{type(exc).__name__}: {str(exc)[:300]}"


def precompile(jobs: list[tuple], workers: int, timeout_s: float) -> dict[tuple, str]:
    """Compile jobs in `workers` processes; returns {job: error}. Unfinished or failed jobs compile again on first
    use in this process (a worker's failure may be its own), except OutOfResources, which is the kernel's."""
    if workers < 1 or not jobs:
        return {}
    start = time.perf_counter()
    errors: dict[tuple, str] = {}
    ctx = multiprocessing.get_context("spawn")
    try:
        with ctx.Pool(workers) as pool:
            pending = pool.imap_unordered(compile_job, jobs)
            for _ in jobs:
                job, err = pending.next(timeout=max(1.0, timeout_s - (time.perf_counter() - start)))
                if err:
                    errors[job] = err
    except (multiprocessing.TimeoutError, OSError, RuntimeError) as exc:
        print(f"precompile stopped early ({type(exc).__name__}); the rest compiles on first use", flush=True)
    print(f"precompiled {len(jobs)} kernels with {workers} workers in {time.perf_counter() - start:.0f} s "
          f"({len(errors)} failed)", flush=True)
    return errors


def job_of(cfg: GemvConfig, dtype: str, m: int, mode: str = "plain") -> tuple[str, str, int, int, int, int, int, str]:
    bm = gk.m_bucket(m) if cfg.kernel == "fma" else 1  # the dot kernel pads M to 16: one binary for all M
    return cfg.kernel, dtype, bm, cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages, mode


# ----------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Weights:
    """`copies` independent copies of one random weight (and fp8 scales), enough bytes to defeat L2."""
    n: int
    k: int
    dtype: str
    w: list[torch.Tensor]
    scale: list[torch.Tensor | None]

    @property
    def bytes(self) -> int:
        return self.n * self.k * ELEMENT[self.dtype] + (4 * self.n if self.dtype == "fp8" else 0)


def make_weights(n: int, k: int, dtype: str, gen: torch.Generator) -> Weights:
    w = (torch.randn(n, k, device=DEVICE, generator=gen) / math.sqrt(k)).to(torch.bfloat16)
    scale = None
    if dtype == "fp8":
        w, scale = quant.quantize_weight_fp8_ref(w)
    per = n * k * ELEMENT[dtype]
    copies = max(4, math.ceil(ROTATE_BYTES / per))
    return Weights(n, k, dtype, [w] + [w.clone() for _ in range(copies - 1)],
                   [scale] + [scale.clone() if scale is not None else None for _ in range(copies - 1)])


def graph_us(call: Callable[[int], object], copies: int, max_s: float) -> float:
    """Median per-call time of max(20, copies) calls captured back to back in one CUDA graph (call(i) uses copy i)."""
    calls = max(MIN_CALLS, copies)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the capture (lazy library init, allocator)
        for i in range(copies):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i % copies)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    begin = time.perf_counter()
    for rep in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
        if rep >= 2 and time.perf_counter() - begin > max_s:
            break
    del graph
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def run_variant(cfg: GemvConfig, x: torch.Tensor, wts: Weights, ref: torch.Tensor, max_s: float,
                prefix: str = "", kw: dict | None = None) -> dict:
    """Check one gemv config on copy 0, then time it over all copies (kw: the input mode's extra arguments)."""
    row: dict = dict(config=dataclasses.asdict(cfg), label=prefix + label(cfg))
    kw = kw or {}
    try:
        out = gk.gemv(x, wts.w[0], wts.scale[0], config=cfg, **kw)
        again = gk.gemv(x, wts.w[0], wts.scale[0], config=cfg, **kw)
        torch.cuda.synchronize()
        row["rel_err"] = rel_err(out, ref)
        row["deterministic"] = bool(torch.equal(out, again))
        if not (row["rel_err"] < REL_TOL and row["deterministic"]):
            row["error"] = "wrong result" if row["deterministic"] else "nondeterministic split-K"
            return row
        row["us"] = graph_us(lambda i: gk.gemv(x, wts.w[i], wts.scale[i], config=cfg, **kw), len(wts.w), max_s)
    except Exception as exc:  # noqa: BLE001 - compile errors / out of resources are results too
        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return row


def run_baselines(x: torch.Tensor, wts: Weights, ref: torch.Tensor, max_s: float, kw: dict | None = None
                  ) -> dict[str, dict]:
    """cuBLAS for bf16; scaled_mm (x pre-quantized), quant+scaled_mm and swiftlm's fp8_linear for fp8. For a fused
    input mode: "unfused", the norm (add + RMSNorm kernel) or activation kernel, then the plain GEMV."""
    copies = len(wts.w)
    if kw:
        from swiftlm.kernels.activation import silu_and_mul
        from swiftlm.kernels.fused_norm import fused_add_rms_norm

        def unfused(i: int) -> torch.Tensor:
            if kw.get("silu_mul"):
                h = silu_and_mul(x)
            else:
                h = fused_add_rms_norm(x, kw["residual"], kw["rms_weight"], kw["rms_eps"])[0]
            return gk.gemv(h, wts.w[i], wts.scale[i])
        fns = {"unfused": unfused}
    elif wts.dtype == "bf16":
        fns = {"cublas": lambda i: F.linear(x, wts.w[i])}
    else:
        xq, xs = quant.per_token_quant_fp8(x)
        fns = {"scaled_mm": lambda i: quant.fp8_gemm_scaled_mm(xq, xs, wts.w[i], wts.scale[i]),
               "quant+mm": lambda i: quant.fp8_linear(x, wts.w[i], wts.scale[i], backend="scaled_mm"),
               "sl_fp8": lambda i: quant.fp8_linear(x, wts.w[i], wts.scale[i], backend="triton_small")}
    out = {}
    for name, fn in fns.items():
        try:
            err = rel_err(fn(0), ref)
            out[name] = dict(us=graph_us(fn, copies, max_s), rel_err=err)
        except Exception as exc:  # noqa: BLE001 - e.g. a shape the library rejects
            out[name] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------

def gbps(nbytes: int, us: float | None) -> float | None:
    return None if us is None else nbytes / (us * 1e-6) / 1e9


def fmt(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


HEADER = (f"{'shape':11} {'N':>6} {'K':>5} {'M':>2} {'dtype':5}| {'best us':>7} {'GB/s':>5} {'%pk':>3} "
          f"{'best config':34}| {'fma':>6} {'dot':>6} | {'cur us':>6} | {'baseline':9} {'us':>6} {'speedup':>7} | "
          f"fp8 extras (us) | ok/tried")


def baseline_name(case: dict) -> tuple[str, str]:
    """(shown name, baselines key) of the path a case's GEMV replaces."""
    if case["mode"] != "plain":
        return "unfused", "unfused"
    return ("cuBLAS", "cublas") if case["dtype"] == "bf16" else ("scaled_mm", "scaled_mm")


def case_line(case: dict, peak: float) -> str:
    """One row of HEADER: best variant, the current config, and the baseline(s) for this case."""
    best = case.get("best") or {}
    base = case["baselines"]
    base_us = {name: entry.get("us") for name, entry in base.items()}
    ref_name, ref_key = baseline_name(case)
    ref_us = base_us.get(ref_key)
    extra = "" if case["dtype"] == "bf16" or case["mode"] != "plain" else (
        f"quant+mm {fmt(base_us.get('quant+mm'), '.1f', 5)} sl_fp8 {fmt(base_us.get('sl_fp8'), '.1f', 5)} "
        f"bf16-cuBLAS {fmt(case.get('bf16_cublas_us'), '.1f', 5)}")
    bw = gbps(case["bytes"], best.get("us"))
    pct = None if bw is None else 100 * bw / peak
    speedup = ref_us / best["us"] if best.get("us") and ref_us else None
    return (f"{case['shape']:11} {case['n']:>6} {case['k']:>5} {case['m']:>2} {case['dtype']:5}| "
            f"{fmt(best.get('us'), '.1f', 7)} {fmt(bw, '.0f', 5)} {fmt(pct, '.0f', 3)} {best.get('label', '-'):34}| "
            f"{fmt(case['best_us']['fma'], '.1f', 6)} {fmt(case['best_us']['dot'], '.1f', 6)} | "
            f"{fmt(case['current'].get('us'), '.1f', 6)} | {ref_name:9} {fmt(ref_us, '.1f', 6)} "
            f"{fmt(speedup, '.2f', 6)}x | {extra} | {case['ok']}/{case['tried']}")


def config_literal(cases: list[dict]) -> str:
    fused = any(case["mode"] != "plain" for case in cases)
    lines = ["FUSED_GEMV_CONFIGS: dict[tuple[int, int, int, str, str], GemvConfig] = {" if fused else
             "GEMV_CONFIGS: dict[tuple[int, int, int, str], GemvConfig] = {"]
    for case in cases:
        best = case.get("best")
        if not best:
            continue
        cfg = GemvConfig(**best["config"])
        name, key = baseline_name(case)
        base = case["baselines"].get(key, {}).get("us")
        note = "" if base is None else f"; {name} {base:.1f} us"
        slower = "  SLOWER than baseline" if base is not None and best["us"] > base else ""
        mode = f", {case['mode']!r}" if fused else ""
        lines.append(f"    ({case['n']}, {case['k']}, {gk.m_bucket(case['m'])}, {case['dtype']!r}{mode}): {cfg!r},  "
                     f"# {best['us']:.1f} us{note}{slower}")
    lines.append("}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--ms", type=int, nargs="+", default=list(MS))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    parser.add_argument("--quick", action="store_true", help="a few layouts only (smoke test)")
    parser.add_argument("--peak-gbps", type=float, default=3000.0)
    parser.add_argument("--budget-s", type=float, default=215.0, help="stop sweeping variants after this long")
    parser.add_argument("--variant-s", type=float, default=0.25, help="cap on timed replays per variant")
    parser.add_argument("--workers", type=int, default=min(16, max(1, (os.cpu_count() or 2) - 2)),
                        help="precompile processes (0 = compile lazily in this process)")
    parser.add_argument("--json", type=pathlib.Path, help="write every measurement here")
    parser.add_argument("--fused", action="store_true", help="sweep the fused-input modes (FUSED_MODES shapes)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(f"{torch.cuda.get_device_name()}  SMs {torch.cuda.get_device_properties(0).multi_processor_count}  "
          f"torch {torch.__version__}  triton {triton.__version__}  peak {args.peak_gbps:.0f} GB/s", flush=True)

    todo = [(name, m, dtype) for m in args.ms for dtype in args.dtypes for name in args.shapes
            if dtype in SHAPES[name][2] and (name in FUSED_MODES or not args.fused)]  # M-major: large M loses first

    def mode_of(name: str) -> str:
        return FUSED_MODES[name] if args.fused else "plain"
    plans = {case: variants(SHAPES[case[0]][0], SHAPES[case[0]][1], case[1], case[2], args.quick, mode_of(case[0]))
             for case in todo}
    current = {case: current_config(SHAPES[case[0]][0], SHAPES[case[0]][1], case[1], case[2], mode_of(case[0]))
               for case in todo}
    jobs = sorted({job_of(cfg, case[2], case[1], mode_of(case[0])) for case, cfgs in plans.items()
                   for cfg in cfgs + [current[case]]})
    failed_jobs = precompile(jobs, args.workers, timeout_s=0.45 * args.budget_s)
    print(f"{len(todo)} cases, {sum(len(v) for v in plans.values())} variants, {len(jobs)} kernels; sweep starts at "
          f"{time.perf_counter() - t0:.0f} s. fma/dot = best of each kernel; cur = current config (gemv_config)")
    print(HEADER, flush=True)

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    weights = {(name, dtype): make_weights(SHAPES[name][0], SHAPES[name][1], dtype, gen)
               for name, dtype in dict.fromkeys((name, dtype) for name, _, dtype in todo)}
    cases, rows, cublas = [], [], {}
    for name, m, dtype in todo:
        n, k, _ = SHAPES[name]
        wts = weights[(name, dtype)]
        mode = mode_of(name)
        x, kw = fused_inputs(m, k, mode, gen)
        ref = mode_ref(x, kw, wts.w[0], wts.scale[0])
        case = dict(shape=name, n=n, k=k, m=m, dtype=dtype, mode=mode, bytes=wts.bytes, copies=len(wts.w))
        case["baselines"] = run_baselines(x, wts, ref, args.variant_s, kw)
        if dtype == "bf16":
            cublas[(name, m)] = case["baselines"].get("cublas", {}).get("us")
        case["bf16_cublas_us"] = cublas.get((name, m))
        case["current"] = run_variant(current[(name, m, dtype)], x, wts, ref, args.variant_s, prefix="current: ",
                                      kw=kw)
        results = [case["current"]]
        over_budget = time.perf_counter() - t0 > args.budget_s
        for cfg in [] if over_budget else plans[(name, m, dtype)]:
            err = failed_jobs.get(job_of(cfg, dtype, m, mode), "")
            results.append(dict(config=dataclasses.asdict(cfg), label=label(cfg), error=err)
                           if err.startswith("OutOfResources") else run_variant(cfg, x, wts, ref, args.variant_s, kw=kw))
        for r in results:
            r.update(shape=name, n=n, k=k, m=m, dtype=dtype, gbps=gbps(wts.bytes, r.get("us")))
        rows += results
        timed = [r for r in results if r.get("us")]
        case.update(tried=len(results), ok=len(timed), swept=not over_budget,
                    best=min(timed, key=lambda r: r["us"]) if timed else None,
                    best_us={kind: min((r["us"] for r in timed if r["config"]["kernel"] == kind), default=None)
                             for kind in ("fma", "dot")})
        cases.append(case)
        print(case_line(case, args.peak_gbps) + ("" if case["swept"] else "  [budget spent: current config only]"),
              flush=True)
        torch.cuda.empty_cache()

    elapsed = time.perf_counter() - t0
    failures = [r for r in rows if r.get("error")]
    print(f"\n==== summary ({elapsed:.0f} s; {len(rows)} variants run, {len(failures)} failed/rejected; "
          f"GB/s = weight bytes / time, %pk of {args.peak_gbps:.0f}; cur = current config; speedup = baseline / best; "
          f"fp8 extras: quant+mm = per-token quant + scaled_mm, sl_fp8 = swiftlm fp8_linear today) ====")
    print(HEADER)
    for case in sorted(cases, key=lambda c: (c["dtype"], list(SHAPES).index(c["shape"]), c["m"])):
        print(case_line(case, args.peak_gbps))
    kinds: dict[str, int] = {}
    for r in failures:
        kinds[r["error"].split(":")[0]] = kinds.get(r["error"].split(":")[0], 0) + 1
    if failures:
        print(f"failures by kind: {kinds}; e.g. {failures[0]['label']}: {failures[0]['error']}")
    print("\n# paste into swiftlm/kernels/gemv.py (keys: N, K, M bucket, weight kind):")
    print(config_literal(sorted(cases, key=lambda c: (c["dtype"], c["n"], c["k"], c["m"]))))
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    git_commit=os.environ.get("SWIFTLM_COMMIT", "unknown"), command=" ".join(sys.argv),
                    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    peak_gbps=args.peak_gbps, elapsed_s=elapsed, budget_s=args.budget_s, rel_tol=REL_TOL,
                    rotate_bytes=ROTATE_BYTES, min_calls=MIN_CALLS)
        args.json.write_text(json.dumps(dict(meta=meta, cases=cases, variants=rows,
                                             compile_errors={str(j): e for j, e in failed_jobs.items()}), indent=1))
    return 0 if all(c.get("best") for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
