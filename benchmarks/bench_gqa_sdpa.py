"""Probe: ways to hand a fresh GQA prompt to cuDNN attention, and what each costs around the kernel.

q `[S, Hq, D]`, k/v `[S, Hkv, D]` (Hq=32, D=128; Hkv=8 for Qwen3-8B, 4 for Qwen3-30B-A3B):
  repeat:  k/v heads repeated to Hq (`repeat_interleave`), q/k/v as `[1, H, S, D]` views, output copied back to
           `[S, Hq, D]` (what `Attention._fresh_prefill` does);
  gqa:     `enable_gqa=True` on the unrepeated k/v, output copied back;
  grouped: batch = kv head, heads = its query group, k/v expanded along heads with stride 0 (no copy);
  grouped-packed: the same on q/k/v that are column slices of one `[S, (Hq + 2 Hkv) * D]` QKV output, as the
           model hands them over.
Each variant runs under the cuDNN backend alone (an error means cuDNN refused it) and is checked against the
math backend. Times are `triton.testing.do_bench` medians.

    PYTHONPATH=$PWD python benchmarks/bench_gqa_sdpa.py --seq 8000 --kv-heads 8 4

`--cold N` instead times the grouped and gqa variants on N prompt lengths never seen before in the process (the
first call of a shape builds cuDNN's execution plan) against a repeat call of the same length, wall clock with a
sync; run it with and without `TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1` (PyTorch's ragged path for BSHD layouts).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench


def repeat(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1).repeat_interleave(group, 0)[None],
                                       v.transpose(0, 1).repeat_interleave(group, 0)[None], is_causal=True, scale=scale)
    out = torch.empty_like(q)
    out.copy_(o[0].transpose(0, 1))
    return out


def gqa(q, k, v, scale):
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       is_causal=True, scale=scale, enable_gqa=True)
    out = torch.empty_like(q)
    out.copy_(o[0].transpose(0, 1))
    return out


def grouped(q, k, v, scale):
    s, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.view(s, hkv, g, d).permute(1, 2, 0, 3)
    kg = k.permute(1, 0, 2)[:, None].expand(hkv, g, s, d)
    vg = v.permute(1, 0, 2)[:, None].expand(hkv, g, s, d)
    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, scale=scale)
    return o.permute(2, 0, 1, 3).reshape(s, hq, d)


def packed(q, k, v):
    """q/k/v copied into one QKV buffer and returned as its column slices."""
    s, hq, d = q.shape
    hkv = k.shape[1]
    qkv = torch.cat([q.reshape(s, -1), k.reshape(s, -1), v.reshape(s, -1)], dim=1)
    return (qkv[:, :hq * d].view(s, hq, d), qkv[:, hq * d:(hq + hkv) * d].view(s, hkv, d),
            qkv[:, (hq + hkv) * d:].view(s, hkv, d))


def cold_calls(num_lengths: int, base: int, hkv: int) -> list[dict]:
    """First and second call (ms, wall with sync) and the warm time (us) of cuDNN grouped and gqa attention on
    packed QKV slices, for `num_lengths` lengths new to the process."""
    rows = []
    for name, fn in (("grouped", grouped), ("gqa", gqa)):
        for s in range(base, base + num_lengths):
            qkv = packed(*(torch.randn(s, h, 128, device="cuda", dtype=torch.bfloat16) for h in (32, hkv, hkv)))
            times = []
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                for _ in range(2):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    fn(*qkv, 128 ** -0.5)
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - t) * 1e3)
                us = do_bench(lambda: fn(*qkv, 128 ** -0.5), warmup=5, rep=20) * 1e3
            rows.append(dict(seq=s, kv_heads=hkv, variant=f"{name} cold", first_ms=times[0], second_ms=times[1],
                             warm_us=us, avoid_recompile=os.environ.get("TORCH_CUDNN_SDPA_AVOID_RECOMPILE", "0")))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[8000, 1024])
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[8])
    ap.add_argument("--cold", type=int, default=0, help="time first calls on this many new lengths instead")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    if args.cold:
        for hkv in args.kv_heads:
            for s in args.seq:
                rows += cold_calls(args.cold, s, hkv)
        args.seq = []
    for hkv in args.kv_heads:
        for s in args.seq:
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(s, h, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
                       for h in (32, hkv, hkv))
            scale = 128 ** -0.5
            with sdpa_kernel([SDPBackend.MATH]):
                want = repeat(q, k, v, scale).float()
            variants = (("repeat", repeat, (q, k, v)), ("gqa", gqa, (q, k, v)), ("grouped", grouped, (q, k, v)),
                        ("grouped-packed", grouped, packed(q, k, v)))
            for name, fn, qkv in variants:
                try:
                    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                        got = fn(*qkv, scale).float()
                        us = do_bench(lambda: fn(*qkv, scale), warmup=5, rep=40) * 1e3
                    err = ((got - want).norm() / want.norm()).item()
                    row = dict(seq=s, kv_heads=hkv, variant=name, us=us, rel_err=err,
                               tflops=4 * s * s / 2 * 32 * 128 / us / 1e6)
                except RuntimeError as exc:
                    row = dict(seq=s, kv_heads=hkv, variant=name, error=str(exc).splitlines()[0][:160])
                rows.append(row)
                print(row, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
