"""Quantized GEMMs and fused kernels on the GPU: correctness vs the `*_ref` twins, then median timings.

fp8:   Qwen3-8B linears (qkv 6144x4096, o 4096x4096, gate_up 24576x4096, down 4096x12288), M = 1..8192:
       torch._scaled_mm (row-wise) vs the Triton small-M and large-M kernels vs bf16 torch.mm, plus the
       whole fp8_linear (activation quant included). Prints recommended FP8_GEMM_DISPATCH thresholds and
       the best small-M tile (FP8_SMALL_M_CONFIG) from a sweep.
awq:   Qwen2.5-32B linears (qkv 7168x5120, o 5120x5120, gate_up 55296x5120, down 5120x27648), M = 1, 8, 16,
       512: GEMV / GEMM / dequantize+mm vs fp16 torch.mm; prints recommended AWQ_DISPATCH.
fused: T = 1, 32, 8192 on Qwen3-8B sizes: rms_norm, add+rms_norm, add+rms_norm+fp8, rope+qk-norm+cache write,
       silu_and_mul(+fp8), each vs the unfused torch sequence.

    python benchmarks/bench_quant_kernels.py [--json PATH] [--sections fp8,awq,fused]

Exits 1 if any correctness check fails (after printing everything and writing the JSON).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from triton.testing import do_bench  # noqa: E402

from swiftlm.kernels import activation, awq, fused_norm, quant, rope  # noqa: E402

DEVICE = "cuda"
FP8_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}
FP8_MS = [1, 8, 16, 32, 64, 128, 512, 8192]
AWQ_SHAPES = {"qkv": (7168, 5120), "o": (5120, 5120), "gate_up": (55296, 5120), "down": (5120, 27648)}
AWQ_MS = [1, 8, 16, 512]
FUSED_TS = [1, 32, 8192]
HIDDEN, INTER, HQ, HKV, HEAD_DIM, EPS = 4096, 12288, 32, 8, 128, 1e-6
SMALL_M_SWEEP = [{"BLOCK_N": n, "BLOCK_K": k} for n in (32, 64, 128) for k in (128, 256)]

checks: list[dict] = []


def median_ms(fn: Callable[[], object]) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def check(name: str, out: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    """Relative max error |out - ref| / max|ref|; recorded and printed on failure."""
    err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp(min=1e-12)).item()
    ok = err <= rtol
    checks.append({"name": name, "rel_max_err": err, "tol": rtol, "ok": ok})
    if not ok:
        print(f"  CHECK FAILED {name}: rel max err {err:.3g} > {rtol}")


def check_fp8(name: str, q: torch.Tensor, s: torch.Tensor, q_ref: torch.Tensor, s_ref: torch.Tensor) -> None:
    """Dequantized FP8 outputs agree to about one e4m3 step (fp32 math may differ by an ulp on the GPU)."""
    check(name, q.float() * s, q_ref.float() * s_ref, 0.075)  # one step at the top of the range is 32/448


# ---------------------------------------------------------------------------------------------------------
# FP8 GEMM
# ---------------------------------------------------------------------------------------------------------

def bench_fp8(results: dict) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for shape, (n, k) in FP8_SHAPES.items():
        w16 = (torch.randn(n, k, device=DEVICE, generator=gen) * 0.02).to(torch.bfloat16)
        w, w_scale = quant.quantize_weight_fp8_ref(w16)
        for m in FP8_MS:
            x = torch.randn(m, k, device=DEVICE, generator=gen).to(torch.bfloat16)
            xq, xs = quant.per_token_quant_fp8(x)
            ref = quant.fp8_gemm_ref(xq, xs, w, w_scale, None, torch.bfloat16)
            row = {"shape": shape, "m": m, "n": n, "k": k,
                   "bf16_mm": median_ms(lambda: F.linear(x, w16)),
                   "quant_act": median_ms(lambda: quant.per_token_quant_fp8(x)),
                   "fp8_linear_auto": median_ms(lambda: quant.fp8_linear(x, w, w_scale)),
                   "auto_backend": quant.select_fp8_backend(xq, w, torch.bfloat16)}
            for backend in ("scaled_mm", "triton_small", "triton_large"):
                if backend == "triton_small" and m > 64:
                    continue
                out = quant.fp8_gemm(xq, xs, w, w_scale, None, torch.bfloat16, backend)
                check(f"fp8 {backend} {shape} M={m}", out, ref, 2e-2)
                row[backend] = median_ms(lambda: quant.fp8_gemm(xq, xs, w, w_scale, None, torch.bfloat16, backend))
            rows.append(row)
            best = min((b for b in ("scaled_mm", "triton_small", "triton_large") if b in row), key=row.get)
            print(f"  fp8 {shape:8s} M={m:5d}: bf16 {row['bf16_mm']:.4f} ms | scaled_mm {row['scaled_mm']:.4f} | "
                  f"triton_small {row.get('triton_small', float('nan')):.4f} | triton_large {row['triton_large']:.4f}"
                  f" | auto(+quant) {row['fp8_linear_auto']:.4f} -> best {best}")
    results["fp8_gemm"] = rows

    sweep = []
    for m in (1, 8):
        for cfg in SMALL_M_SWEEP:
            total = 0.0
            for shape, (n, k) in FP8_SHAPES.items():
                w, w_scale = quant.quantize_weight_fp8_ref(torch.randn(n, k, device=DEVICE, generator=gen) * 0.02)
                xq, xs = quant.per_token_quant_fp8(torch.randn(m, k, device=DEVICE, generator=gen))
                total += median_ms(lambda: quant.fp8_gemm_triton_small_m(xq, xs, w, w_scale, None, torch.bfloat16,
                                                                         config=cfg))
            sweep.append({"m": m, **cfg, "total_ms": total})
    results["fp8_small_m_sweep"] = sweep
    totals: dict[tuple[int, int], float] = {}
    for r in sweep:
        totals[r["BLOCK_N"], r["BLOCK_K"]] = totals.get((r["BLOCK_N"], r["BLOCK_K"]), 0.0) + r["total_ms"]
    block_n, block_k = min(totals, key=totals.get)
    return {"FP8_GEMM_DISPATCH": recommend_fp8(rows), "FP8_SMALL_M_CONFIG": {"BLOCK_N": block_n, "BLOCK_K": block_k}}


def _best_per_m(rows: list[dict], backends: tuple[str, ...], ms: list[int]) -> dict[int, str]:
    """For each M, the backend with the least total time over all shapes (what one decoder layer pays)."""
    best = {}
    for m in ms:
        at_m = [r for r in rows if r["m"] == m]
        totals = {b: sum(r[b] for r in at_m) for b in backends if all(b in r for r in at_m)}
        best[m] = min(totals, key=totals.get)
    return best


def recommend_fp8(rows: list[dict]) -> dict[str, int]:
    """Thresholds grow from M = 1 only while the faster backend keeps winning at every tested M."""
    best = _best_per_m(rows, ("scaled_mm", "triton_small", "triton_large"), FP8_MS)
    small_max = large_max = 0
    for m in FP8_MS:
        if best[m] != "triton_small":
            break
        small_max = m
    for m in (m for m in FP8_MS if m > small_max):
        if best[m] != "triton_large":
            break
        large_max = m
    return {"triton_small_m_max": small_max, "triton_large_m_max": large_max}


# ---------------------------------------------------------------------------------------------------------
# AWQ
# ---------------------------------------------------------------------------------------------------------

def bench_awq(results: dict) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    group = 128
    rows = []
    for shape, (n, k) in AWQ_SHAPES.items():
        qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (k, n // 8), device=DEVICE, generator=gen, dtype=torch.int64)
        qweight = qweight.to(torch.int32)
        qzeros = awq.awq_pack(torch.randint(0, 16, (k // group, n), device=DEVICE, generator=gen))
        scales = (torch.rand(k // group, n, device=DEVICE, generator=gen) * 0.01 + 0.001).half()
        w16 = awq.awq_dequantize_ref(qweight, qzeros, scales, group, torch.float16).t().contiguous()
        for m in AWQ_MS:
            x = torch.randn(m, k, device=DEVICE, generator=gen).half()
            ref = awq.awq_gemm_ref(x, qweight, qzeros, scales, group)
            row = {"shape": shape, "m": m, "n": n, "k": k, "fp16_mm": median_ms(lambda: F.linear(x, w16)),
                   "auto_backend": awq.select_awq_backend(x)}
            for backend in ("gemv", "gemm", "dequant_mm"):
                if backend == "gemv" and m > 8:
                    continue
                out = awq.awq_gemm(x, qweight, qzeros, scales, group, backend=backend)
                check(f"awq {backend} {shape} M={m}", out, ref, 1e-2)
                row[backend] = median_ms(lambda: awq.awq_gemm(x, qweight, qzeros, scales, group, backend=backend))
            rows.append(row)
            print(f"  awq {shape:8s} M={m:5d}: fp16 {row['fp16_mm']:.4f} ms | gemv {row.get('gemv', float('nan')):.4f}"
                  f" | gemm {row['gemm']:.4f} | dequant_mm {row['dequant_mm']:.4f}")
    results["awq_gemm"] = rows
    deq = awq.awq_dequantize(qweight, qzeros, scales, group)
    check("awq dequantize kernel", deq, awq.awq_dequantize_ref(qweight, qzeros, scales, group), 1e-3)

    gemv_max = 0
    for m in (1, 8):
        at_m = [r for r in rows if r["m"] == m]
        if sum(r["gemv"] for r in at_m) < sum(r["gemm"] for r in at_m):
            gemv_max = m
        else:
            break
    dequant_min = 1 << 30
    for m in reversed(AWQ_MS):
        at_m = [r for r in rows if r["m"] == m]
        if sum(r["dequant_mm"] for r in at_m) < sum(r["gemm"] for r in at_m):
            dequant_min = m
        else:
            break
    return {"AWQ_DISPATCH": {"gemv_max_m": gemv_max, "dequant_mm_min_m": dequant_min}}


# ---------------------------------------------------------------------------------------------------------
# Fused kernels
# ---------------------------------------------------------------------------------------------------------

def _rope_unfused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  cos_sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                  q_w: torch.Tensor, k_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a model without the fused kernel runs: two RMSNorms, rotary on q and k, two cache scatters."""
    q = fused_norm.rms_norm_ref(q, q_w, EPS)
    k = fused_norm.rms_norm_ref(k, k_w, EPS)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    q, k = rotate(q), rotate(k)
    k_cache.view(-1, HKV, HEAD_DIM).index_copy_(0, slots, k)
    v_cache.view(-1, HKV, HEAD_DIM).index_copy_(0, slots, v)
    return q, k


def bench_fused(results: dict) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    bf16 = torch.bfloat16

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEVICE, generator=gen).to(bf16)

    rows = []
    norm_w = randn(HIDDEN)
    cos_sin = rope.compute_cos_sin_cache(HEAD_DIM, 40960, 1e6, DEVICE)
    qk_w = (randn(HEAD_DIM), randn(HEAD_DIM))
    num_blocks, block_size = 1024, 16
    k_cache = torch.zeros(num_blocks, block_size, HKV, HEAD_DIM, device=DEVICE, dtype=bf16)
    v_cache = torch.zeros_like(k_cache)
    for t in FUSED_TS:
        x, r = randn(t, HIDDEN), randn(t, HIDDEN)
        gate_up = randn(t, 2 * INTER)
        qkv = randn(t, (HQ + 2 * HKV) * HEAD_DIM)
        q = qkv[:, :HQ * HEAD_DIM].view(t, HQ, HEAD_DIM)
        k = qkv[:, HQ * HEAD_DIM:(HQ + HKV) * HEAD_DIM].view(t, HKV, HEAD_DIM)
        v = qkv[:, (HQ + HKV) * HEAD_DIM:].view(t, HKV, HEAD_DIM)
        positions = torch.randint(0, 40960, (t,), device=DEVICE, generator=gen)
        slots = torch.randperm(num_blocks * block_size, device=DEVICE, generator=gen)[:t]

        check(f"rms_norm T={t}", fused_norm.rms_norm(x, norm_w, EPS), fused_norm.rms_norm_ref(x, norm_w, EPS), 2e-2)
        y, res = fused_norm.fused_add_rms_norm(x, r, norm_w, EPS)
        y_ref, res_ref = fused_norm.fused_add_rms_norm_ref(x, r, norm_w, EPS)
        check(f"add_rms_norm out T={t}", y, y_ref, 2e-2)
        check(f"add_rms_norm residual T={t}", res, res_ref, 1e-2)
        q8, s8, _ = fused_norm.fused_add_rms_norm_fp8(x, r, norm_w, EPS)
        q8_ref, s8_ref, _ = fused_norm.fused_add_rms_norm_fp8_ref(x, r, norm_w, EPS)
        check_fp8(f"add_rms_norm_fp8 T={t}", q8, s8, q8_ref, s8_ref)
        check(f"silu_and_mul T={t}", activation.silu_and_mul(gate_up), activation.silu_and_mul_ref(gate_up), 2e-2)
        check_fp8(f"silu_and_mul_fp8 T={t}", *activation.silu_and_mul_fp8(gate_up),
                  *activation.silu_and_mul_fp8_ref(gate_up))
        kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
        q_ref, k_ref = rope.rope_qk_norm_cache_ref(q, k, v, positions, cos_sin, kc_ref, vc_ref, slots, *qk_w, EPS)
        q_in, k_in = q.clone(), k.clone()
        rope.rope_qk_norm_cache(q_in, k_in, v, positions, cos_sin, k_cache, v_cache, slots, *qk_w, EPS)
        check(f"rope_qk_norm q T={t}", q_in, q_ref, 2e-2)
        check(f"rope_qk_norm k T={t}", k_in, k_ref, 2e-2)
        check(f"rope cache write T={t}", k_cache.view(-1, HKV, HEAD_DIM)[slots], kc_ref.view(-1, HKV, HEAD_DIM)[slots],
              2e-2)

        cases = {
            "rms_norm": (lambda: fused_norm.rms_norm(x, norm_w, EPS),
                         lambda: fused_norm.rms_norm_ref(x, norm_w, EPS)),
            "add_rms_norm": (lambda: fused_norm.fused_add_rms_norm(x, r, norm_w, EPS),
                             lambda: fused_norm.fused_add_rms_norm_ref(x, r, norm_w, EPS)),
            "add_rms_norm_fp8": (lambda: fused_norm.fused_add_rms_norm_fp8(x, r, norm_w, EPS),
                                 lambda: fused_norm.fused_add_rms_norm_fp8_ref(x, r, norm_w, EPS)),
            # In place on fresh views each call would need a copy; rotating the same buffer repeatedly is fine.
            "rope_qk_norm_cache": (lambda: rope.rope_qk_norm_cache(q, k, v, positions, cos_sin, k_cache, v_cache,
                                                                   slots, *qk_w, EPS),
                                   lambda: _rope_unfused(q, k, v, positions, cos_sin, k_cache, v_cache, slots,
                                                         *qk_w)),
            "silu_and_mul": (lambda: activation.silu_and_mul(gate_up),
                             lambda: activation.silu_and_mul_ref(gate_up)),
            "silu_and_mul_fp8": (lambda: activation.silu_and_mul_fp8(gate_up),
                                 lambda: activation.silu_and_mul_fp8_ref(gate_up)),
        }
        for name, (fused, unfused) in cases.items():
            row = {"kernel": name, "t": t, "fused": median_ms(fused), "unfused_torch": median_ms(unfused)}
            rows.append(row)
            print(f"  {name:18s} T={t:5d}: fused {row['fused'] * 1e3:8.1f} us | "
                  f"unfused {row['unfused_torch'] * 1e3:8.1f} us | x{row['unfused_torch'] / row['fused']:.2f}")
    results["fused"] = rows


# ---------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------

def summary(results: dict) -> None:
    print("\n==== summary (median ms) ====")
    if "fp8_gemm" in results:
        print(f"{'fp8 shape':10s} {'M':>5s} {'bf16':>8s} {'scaled':>8s} {'tr_small':>8s} {'tr_large':>8s} "
              f"{'auto+q':>8s} {'auto':>12s}")
        for r in results["fp8_gemm"]:
            print(f"{r['shape']:10s} {r['m']:5d} {r['bf16_mm']:8.4f} {r['scaled_mm']:8.4f} "
                  f"{r.get('triton_small', float('nan')):8.4f} {r['triton_large']:8.4f} {r['fp8_linear_auto']:8.4f} "
                  f"{r['auto_backend']:>12s}")
    if "awq_gemm" in results:
        print(f"{'awq shape':10s} {'M':>5s} {'fp16':>8s} {'gemv':>8s} {'gemm':>8s} {'deq+mm':>8s}")
        for r in results["awq_gemm"]:
            print(f"{r['shape']:10s} {r['m']:5d} {r['fp16_mm']:8.4f} {r.get('gemv', float('nan')):8.4f} "
                  f"{r['gemm']:8.4f} {r['dequant_mm']:8.4f}")
    if "fused" in results:
        print(f"{'fused kernel':20s} {'T':>5s} {'fused us':>9s} {'torch us':>9s} {'speedup':>8s}")
        for r in results["fused"]:
            print(f"{r['kernel']:20s} {r['t']:5d} {r['fused'] * 1e3:9.1f} {r['unfused_torch'] * 1e3:9.1f} "
                  f"{r['unfused_torch'] / r['fused']:8.2f}")
    for name, value in results.get("recommended", {}).items():
        print(f"recommended {name} = {value}")
    failed = [c["name"] for c in checks if not c["ok"]]
    print(f"checks: {len(checks) - len(failed)}/{len(checks)} passed" + (f"; FAILED: {failed}" if failed else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=pathlib.Path, help="write all figures here")
    parser.add_argument("--sections", default="fp8,awq,fused", help="comma list of fp8, awq, fused")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    sections = set(args.sections.split(","))
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "recommended": {}}
    if "fp8" in sections:
        print("== fp8 gemm ==")
        results["recommended"].update(bench_fp8(results))
    if "awq" in sections:
        print("== awq ==")
        results["recommended"].update(bench_awq(results))
    if "fused" in sections:
        print("== fused ==")
        bench_fused(results)
    results["checks"] = checks
    summary(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if any(not c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
