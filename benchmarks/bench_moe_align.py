"""MoE pair alignment on the GPU: the Triton kernels of `align_tokens` against its PyTorch-ops version.

Both group the T*k pairs of Qwen3-30B-A3B-sized routing (128 experts, top-8) by expert with runs padded to
`block_m`; first checked equal (each expert's run as a set, the block experts and the used length), then timed in a
CUDA graph (per call, 20 calls back to back).

    PYTHONPATH=$PWD python benchmarks/bench_moe_align.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from graph_timer import graph_ms  # benchmarks/ is on sys.path when this script runs
from swiftlm.kernels import moe_align


def runs(sorted_ids: torch.Tensor, expert_ids: torch.Tensor, post_pad: torch.Tensor, block_m: int
         ) -> tuple[dict[int, list[int]], list[int], int]:
    """Each expert's pairs (sorted), the used blocks' experts and the used length, on the host."""
    used = int(post_pad.item())
    blocks = expert_ids[: used // block_m].tolist()
    ids = sorted_ids[:used].view(-1, block_m).tolist()
    grouped: dict[int, list[int]] = {}
    for expert, block in zip(blocks, ids):
        grouped.setdefault(expert, []).extend(block)
    return {e: sorted(v) for e, v in grouped.items()}, blocks, used


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 200, 1000, 8000])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--block-m", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for tokens in args.tokens:
        scores = torch.rand(tokens, args.experts, generator=gen, device="cuda")
        ids = scores.topk(args.top_k, dim=1).indices.to(torch.int32)
        triton_out = moe_align.align_tokens(ids, args.experts, args.block_m)
        torch_out = moe_align._align_tokens_torch(ids.reshape(-1), args.experts, args.block_m)
        same = runs(*triton_out, args.block_m) == runs(*torch_out, args.block_m)
        t_us = graph_ms([lambda: moe_align.align_tokens(ids, args.experts, args.block_m)] * 20) * 1e3
        p_us = graph_ms([lambda: moe_align._align_tokens_torch(ids.reshape(-1), args.experts, args.block_m)] * 20) * 1e3
        rows.append(dict(tokens=tokens, pairs=tokens * args.top_k, equal=same, triton_us=t_us, torch_us=p_us))
        print(f"T={tokens:6d} pairs={tokens * args.top_k:6d} equal={same}  triton {t_us:7.1f} us  "
              f"torch ops {p_us:7.1f} us")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  git_commit=os.environ.get("SWIFTLM_COMMIT", "unknown"), command="python " + " ".join(sys.argv),
                  experts=args.experts, top_k=args.top_k, block_m=args.block_m, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if not all(r["equal"] for r in rows):
        raise SystemExit("the Triton alignment differs from the PyTorch one")


if __name__ == "__main__":
    main()
