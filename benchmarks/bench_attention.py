"""Paged attention kernels on the GPU: correctness on realistic shapes, then median timings.

Qwen3-8B attention (Hq=32, Hkv=8, D=128, bf16, block_size 16, shuffled block tables):
  decode  B=1 x ctx 512/8192/32768, B=32 x ctx 1024/4096/8192, B=128 x ctx 1024/4096, B=256 x ctx 1280 ->
          achieved KV-read GB/s vs peak, for each `--kv-dtype` cache (bf16, fp8 = e4m3);
  prefill 1 x 8000 tokens, 8 x 1024 tokens, and a 2048-token chunk over a 6144-token prefix -> causal
          TFLOP/s, beside torch SDPA (flash, cuDNN) on dense tensors of the same shapes.
`--sweep` adds decode num_splits/block_n (small batches and every fp8 case) and prefill tile variants;
`--decode-only` skips the prefill cases. Needs only swiftlm.kernels.attention.

    python benchmarks/bench_attention.py [--json PATH] [--sweep] [--kv-dtype bf16 fp8] [--decode-only]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from swiftlm.kernels.attention import (  # noqa: E402
    decode_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_prefill_attention,
)

DEVICE = "cuda"
HQ, HKV, HEAD_DIM, BLOCK_SIZE, DTYPE = 32, 8, 128, 16, torch.bfloat16
SCALE = HEAD_DIM ** -0.5
PEAK_GBPS = 3000.0
ATOL = 3e-2


def median_ms(fn) -> float:
    return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))


def paged_cache(seq_lens: list[int], gen: torch.Generator,
                kv_dtype: torch.dtype = DTYPE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches (kv_dtype) holding exactly the needed blocks, handed out in shuffled order."""
    needed = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(needed)
    shape = (num_blocks, BLOCK_SIZE, HKV, HEAD_DIM)
    k_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE, generator=gen)
    v_cache = torch.randn(shape, device=DEVICE, dtype=DTYPE, generator=gen)
    k_cache, v_cache = k_cache.to(kv_dtype), v_cache.to(kv_dtype)
    perm = torch.randperm(num_blocks, device=DEVICE, generator=gen).int()
    tables = torch.zeros(len(seq_lens), max(needed), dtype=torch.int32, device=DEVICE)
    offset = 0
    for i, n in enumerate(needed):
        tables[i, :n] = perm[offset:offset + n]
        offset += n
    return k_cache, v_cache, tables


def bench_decode(batch: int, ctx: int, sweep: bool, gen: torch.Generator, kv_dtype: torch.dtype = DTYPE) -> list[dict]:
    seq_lens = [ctx] * batch
    k_cache, v_cache, tables = paged_cache(seq_lens, gen, kv_dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, HQ, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
    out = torch.empty_like(q)
    kv_bytes = 2 * sum(seq_lens) * HKV * HEAD_DIM * k_cache.element_size()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = decode_num_splits(batch, HKV, tables.shape[1] * BLOCK_SIZE, sms)

    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, SCALE).float()
    err = (paged_decode_attention(q, k_cache, v_cache, tables, lens, SCALE).float() - ref).abs().max().item()
    del ref

    variants: list[tuple[str, int | None, int | None]] = [("heuristic", None, None)]
    if sweep:
        variants += [(f"splits={s}", s, None) for s in (1, 2, 4, 8, 16, 32, 64) if s != chosen]
        variants += [(f"block_n={n}", None, n) for n in (32, 64, 128, 256)]
    rows = []
    for label, splits, block_n in variants:
        ms = median_ms(functools.partial(paged_decode_attention, q, k_cache, v_cache, tables, lens, SCALE,
                                         num_splits=splits, out=out, block_n=block_n))
        gbps = kv_bytes / (ms * 1e-3) / 1e9
        rows.append(dict(kind="decode", case=f"B={batch} ctx={ctx} {str(kv_dtype)[6:]}", variant=label,
                         num_splits=splits or chosen, us=ms * 1e3, gbps=gbps, pct_peak=100 * gbps / PEAK_GBPS,
                         max_abs_err=err, ok=err <= ATOL))
    return rows


def causal_flops(pairs: list[tuple[int, int]]) -> float:
    """4 * Hq * D * (keys attended, summed over queries): QK^T and PV, 2 FLOPs per multiply-add."""
    keys = sum(q_len * (n - q_len) + q_len * (q_len + 1) // 2 for q_len, n in pairs)
    return 4.0 * HQ * HEAD_DIM * keys


def bench_prefill(name: str, pairs: list[tuple[int, int]], sweep: bool, gen: torch.Generator) -> list[dict]:
    """pairs: (q_len, seq_len) per sequence; the dense K/V of every sequence is scattered into the paged cache."""
    seq_lens = [n for _, n in pairs]
    k_cache, v_cache, tables = paged_cache(seq_lens, gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    cu = torch.tensor([0] + [sum(q for q, _ in pairs[:i + 1]) for i in range(len(pairs))], dtype=torch.int32,
                      device=DEVICE)
    max_q = max(q for q, _ in pairs)
    q = torch.randn(int(cu[-1]), HQ, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
    out = torch.empty_like(q)
    flops = causal_flops(pairs)

    # Dense oracle and baseline need one (q_len, seq_len) shape for the whole batch.
    q_len, seq_len = pairs[0]
    assert all(p == pairs[0] for p in pairs)
    pos = torch.arange(seq_len, device=DEVICE)
    slots = tables[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    k_dense = k_cache.view(-1, HKV, HEAD_DIM)[slots].transpose(1, 2).repeat_interleave(HQ // HKV, 1).contiguous()
    v_dense = v_cache.view(-1, HKV, HEAD_DIM)[slots].transpose(1, 2).repeat_interleave(HQ // HKV, 1).contiguous()
    q_dense = q.view(len(pairs), q_len, HQ, HEAD_DIM).transpose(1, 2).contiguous()
    # Pure prefill is ordinary causal; a chunk over a prefix needs bottom-right alignment.
    mask = None if q_len == seq_len else causal_lower_right(q_len, seq_len)

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q_dense, k_dense, v_dense, attn_mask=mask,
                                                                 is_causal=mask is None, scale=SCALE)

    expected = sdpa()
    got = paged_prefill_attention(q, k_cache, v_cache, tables, cu, lens, SCALE, max_q)
    err = (got.view(len(pairs), q_len, HQ, HEAD_DIM).transpose(1, 2).float() - expected.float()).abs().max().item()
    del expected, got

    variants: list[tuple[str, int | None, int | None]] = [("default", None, None)]
    if sweep:
        variants += [(f"bm={m} bn={n}", m, n) for m, n in ((128, 32), (128, 128), (64, 64), (64, 32))]
    rows = []
    for label, block_m, block_n in variants:
        try:
            ms = median_ms(functools.partial(paged_prefill_attention, q, k_cache, v_cache, tables, cu, lens, SCALE,
                                             max_q, out=out, block_m=block_m, block_n=block_n))
        except OutOfResources as exc:
            rows.append(dict(kind="prefill", case=name, variant=label, error=str(exc)))
            continue
        rows.append(dict(kind="prefill", case=name, variant=label, us=ms * 1e3, tflops=flops / (ms * 1e-3) / 1e12,
                         max_abs_err=err, ok=err <= ATOL))

    for backend_name in ("FLASH_ATTENTION", "CUDNN_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, backend_name)):
                ms = median_ms(sdpa)
        except RuntimeError as exc:  # backend unavailable for this shape/mask
            rows.append(dict(kind="prefill", case=name, variant=f"sdpa {backend_name.lower()}",
                             error=str(exc).splitlines()[0][:120]))
            continue
        rows.append(dict(kind="prefill", case=name, variant=f"sdpa {backend_name.lower()}", us=ms * 1e3,
                         tflops=flops / (ms * 1e-3) / 1e12))
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'kind':8s} {'case':24s} {'variant':22s} {'splits':>6s} {'us':>10s} {'GB/s':>8s} {'%peak':>6s} "
          f"{'TFLOP/s':>8s} {'maxerr':>8s} ok")
    for r in rows:
        if "error" in r:
            print(f"{r['kind']:8s} {r['case']:24s} {r['variant']:22s} error: {r['error']}")
            continue
        print(f"{r['kind']:8s} {r['case']:24s} {r['variant']:22s} {r.get('num_splits', ''):>6} {r['us']:10.1f} "
              f"{r.get('gbps', math.nan):8.0f} {r.get('pct_peak', math.nan):6.1f} {r.get('tflops', math.nan):8.1f} "
              f"{r.get('max_abs_err', math.nan):8.2e} {'' if 'ok' not in r else ('yes' if r['ok'] else 'NO')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=pathlib.Path, help="write results here")
    parser.add_argument("--sweep", action="store_true", help="also time tuning variants")
    parser.add_argument("--kv-dtype", choices=("bf16", "fp8"), nargs="+", default=["bf16"],
                        help="decode cache dtypes (fp8: e4m3)")
    parser.add_argument("--decode-only", action="store_true", help="skip the prefill cases")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows: list[dict] = []
    kv_dtypes = [torch.bfloat16 if d == "bf16" else torch.float8_e4m3fn for d in args.kv_dtype]
    for kv_dtype in kv_dtypes:
        for batch, ctx in [(1, 512), (1, 8192), (1, 32768), (32, 1024), (32, 4096), (32, 8192), (128, 1024),
                           (128, 4096), (256, 1280)]:
            rows += bench_decode(batch, ctx, args.sweep and (batch <= 32 or kv_dtype != DTYPE), gen, kv_dtype)
            print(f"decode B={batch} ctx={ctx} {kv_dtype} done", flush=True)
            torch.cuda.empty_cache()
    prefills = [("1x8000", [(8000, 8000)]), ("8x1024", [(1024, 1024)] * 8), ("chunk 2048 over 6144", [(2048, 8192)])]
    for name, pairs in [] if args.decode_only else prefills:
        rows += bench_prefill(name, pairs, args.sweep, gen)
        print(f"prefill {name} done", flush=True)
        torch.cuda.empty_cache()

    print(f"\n{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"Hq={HQ} Hkv={HKV} D={HEAD_DIM} {DTYPE} block_size={BLOCK_SIZE}  peak={PEAK_GBPS:.0f} GB/s")
    print_table(rows)
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__)
        args.json.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    return 0 if all(r.get("ok", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
