"""Greedy agreement of FP8 PTPC (online `--quantization fp8`) with bf16 over 256 generated tokens (issue 5).

A small model (default: the Qwen3-0.6B config) with random weights, seeded, so every run quantizes the same bf16
weights. bf16 generates 256 greedy tokens for each prompt; then each other precision is fed bf16's sequence and
predicts every position (teacher forcing), so one early flip does not decide all later positions. Reported per
precision: the share of positions whose greedy token equals bf16's, and the share of the free-running tokens that
equal bf16's up to the first divergence. fp32 vs bf16 runs beside it as the yardstick: how often bf16 itself flips
a near-tie of this random model.

    PYTHONPATH=$PWD python benchmarks/bench_fp8_agreement.py [--model benchmarks/models/qwen3-0.6b] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys

import torch

from swiftlm import SamplingParams
from swiftlm.engine.llm import LLM


def engine(model: str, **kwargs: object) -> LLM:
    return LLM(model, load_format="dummy", seed=0, gpu_memory_utilization=0.3, max_num_seqs=64, **kwargs)


def release(llm: LLM) -> None:
    llm.engine = None
    gc.collect()
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="benchmarks/models/qwen3-0.6b")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (args.prompt_len,), generator=gen).tolist() for _ in range(args.prompts)]
    greedy = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    ref = engine(args.model, dtype="bfloat16")
    bf16 = [o.token_ids for o in ref.generate(prompts, greedy, use_tqdm=False)]
    release(ref)
    prefixes = [p + out[:j] for p, out in zip(prompts, bf16) for j in range(args.new_tokens)]
    expected = [t for out in bf16 for t in out]

    results = {}
    for name, kwargs in (("fp8", dict(dtype="bfloat16", quantization="fp8")), ("fp32", dict(dtype="float32"))):
        llm = engine(args.model, **kwargs)
        forced = [o.token_ids[0] for o in llm.generate(prefixes, one, use_tqdm=False)]
        free = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        release(llm)
        prefix_match = []
        for a, b in zip(free, bf16):
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b))
            prefix_match.append(n)
        results[name] = dict(
            teacher_forced_agreement=sum(f == e for f, e in zip(forced, expected)) / len(expected),
            free_running_identical_prefix_mean=sum(prefix_match) / len(prefix_match) / args.new_tokens,
            free_running_first_divergence=prefix_match)
        print(f"{name:5} vs bf16: teacher-forced greedy agreement {results[name]['teacher_forced_agreement']:.4f} "
              f"over {len(expected)} positions; free-running identical prefix {prefix_match} of {args.new_tokens}",
              flush=True)
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, model=args.model,
                    commit=os.environ.get("SWIFTLM_COMMIT", "unknown"),
                    date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    command=" ".join(sys.argv), prompts=args.prompts, prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
