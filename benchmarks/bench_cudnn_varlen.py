"""Probe: cuDNN's ragged (varlen) attention for fresh prompts, with the plan's max length rounded up to a bucket.

`torch.ops.aten._cudnn_attention_forward` takes token-major q `[T, Hq, D]`, k/v `[T, Hkv, D]` and cumulative
sequence offsets; the plan is built for (max_q, max_k) while the offsets (device tensors) carry the real lengths.
If a plan built for a bucket serves every length in it, fresh prompts of any length take one cuDNN call, with
no tail on another kernel and no copy of the output. For Hq=32, D=128 and Hkv 8 and 4 this prints, per layout
(q/k/v as column views of one packed QKV output, or contiguous copies): the error against fp32 math attention
on ragged lengths; first-call and repeat wall time of new lengths inside one bucket and across buckets; and the
time of one 8000-token prompt against `fresh_prefill_attention` (cuDNN on the aligned rows plus a FlashAttention
tail).

    PYTHONPATH=$PWD python benchmarks/bench_cudnn_varlen.py [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from swiftlm.layers.attention import fresh_prefill_attention

HQ, D, BUCKET = 32, 128, 256


def bucket(n: int) -> int:
    return -(-n // BUCKET) * BUCKET


def varlen(q, k, v, lens: list[int], scale: float):
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=q.device)
    top = bucket(max(lens))
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, top, top, False, 0.0, True, False,
                                                   scale=scale)[0]


def reference(q, k, v, lens: list[int], scale: float) -> torch.Tensor:
    outs, start = [], 0
    group = q.shape[1] // k.shape[1]
    for n in lens:
        part = slice(start, start + n)
        kr, vr = (t[part].float().repeat_interleave(group, 1).transpose(0, 1) for t in (k, v))
        outs.append(F.scaled_dot_product_attention(q[part].float().transpose(0, 1), kr, vr, is_causal=True,
                                                   scale=scale).transpose(0, 1))
        start += n
    return torch.cat(outs)


def operands(total: int, hkv: int, packed: bool, gen: torch.Generator):
    qkv = torch.randn(total, (HQ + 2 * hkv) * D, device="cuda", dtype=torch.bfloat16, generator=gen)
    q, k, v = qkv.split([HQ * D, hkv * D, hkv * D], -1)
    q, k, v = q.view(total, HQ, D), k.view(total, hkv, D), v.view(total, hkv, D)
    if not packed:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return q, k, v


def wall_ms(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    scale = D ** -0.5
    rows = []
    for hkv in (8, 4):
        for packed in (True, False):
            row = dict(kv_heads=hkv, packed=packed)
            try:
                lens = [700, 2100, 5]
                q, k, v = operands(sum(lens), hkv, packed, gen)
                out = varlen(q, k, v, lens, scale)
                want = reference(q, k, v, lens, scale)
                row["rel_err"] = ((out.float() - want).norm() / want.norm()).item()
                row["out_shape"], row["out_stride"] = list(out.shape), list(out.stride())
                q, k, v = operands(8000, hkv, packed, gen)
                cold = {}
                for n in (7936, 7990, 7800, 7700, 6000, 4000):  # 7936..7700: one bucket (8192 / 7936 / 7936)
                    first = wall_ms(lambda: varlen(q[:n], k[:n], v[:n], [n], scale))
                    again = wall_ms(lambda: varlen(q[:n], k[:n], v[:n], [n], scale))
                    cold[n] = dict(bucket=bucket(n), first_ms=first, again_ms=again)
                row["cold"] = cold
                row["varlen_8000_us"] = 1e3 * do_bench(lambda: varlen(q, k, v, [8000], scale))
                row["split_8000_us"] = 1e3 * do_bench(lambda: fresh_prefill_attention(q, k, v, [8000], scale))
                lens8 = [1000] * 8
                row["varlen_8x1000_us"] = 1e3 * do_bench(lambda: varlen(q, k, v, lens8, scale))
                row["split_8x1000_us"] = 1e3 * do_bench(lambda: fresh_prefill_attention(q, k, v, lens8, scale))
            except Exception as exc:  # noqa: BLE001 - a refusal is the finding
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           git_commit=os.environ.get("SWIFTLM_COMMIT", "unknown"), command=" ".join(sys.argv),
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
