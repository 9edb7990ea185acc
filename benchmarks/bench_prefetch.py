"""Decode-step GPU time against the cross-kernel weight prefetch budget (`SWIFTLM_PREFETCH_MB`), one engine.

For each batch size: that many 512-token prompts decode, then the engine's decode step is recaptured as a CUDA
graph under each setting (budget in MB; 0 = early release and prefetch off; "early" = early release without
prefetch; "nopdl" = no programmatic dependent launch at all) and replayed. Settings run in rounds (every setting once per round) so that clock drift shows as
spread, not as a difference. Prints a table and writes every replay time to --json.

    PYTHONPATH=$PWD python benchmarks/bench_prefetch.py --model benchmarks/models/qwen3-8b --budgets 0 8 16 32
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess

import torch

from swiftlm import SamplingParams
from swiftlm.engine.llm import LLM
from swiftlm.kernels.triton_support import set_pdl, set_prefetch_budget

from profile_engine import decode_graph, graph_ms


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("SWIFTLM_COMMIT", "unknown")


def apply(setting: str) -> None:
    """A budget in MB, "nopdl", or "early": successors released early, no prefetch (a 1-byte budget)."""
    set_pdl(setting != "nopdl")
    set_prefetch_budget(0 if setting == "nopdl" else 1 / (1 << 20) if setting == "early" else float(setting))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/qwen3-8b")
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--budgets", nargs="+", default=["0", "8", "16", "32"], help="MB, or nopdl")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", max_num_seqs=max(256, *args.batch_sizes),
              quantization=args.quantization)
    engine, runner = llm.engine, llm.engine.model_runner
    greedy = SamplingParams(max_tokens=10_000, ignore_eos=True, temperature=0.0)
    gen = torch.Generator().manual_seed(0)
    results: dict[str, dict[str, list[float]]] = {}
    for bs in args.batch_sizes:
        names = [f"b{bs}_{i}" for i in range(bs)]
        for name in names:
            engine.add_request(name, torch.randint(1000, 30000, (512,), generator=gen).tolist(), greedy)
        for _ in range(8):
            engine.step()
        times: dict[str, list[float]] = {s: [] for s in args.budgets}
        for _ in range(args.rounds):
            for setting in args.budgets:
                apply(setting)
                times[setting].append(graph_ms(decode_graph(runner, bs), reps=200))
        apply("16")
        for name in names:
            engine.abort_request(name)
        engine.step()
        results[str(bs)] = times
        for setting in args.budgets:
            t = times[setting]
            print(f"bs={bs:3d} setting {setting:>6}: median {statistics.median(t):.4f} ms "
                  f"(min {min(t):.4f}, max {max(t):.4f})", flush=True)
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "git_commit": os.environ.get("SWIFTLM_COMMIT", git_commit()),
              "command": "python benchmarks/bench_prefetch.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if v is not None and k != "json"),
              "model": args.model, "quantization": args.quantization,
              "unit": "ms of GPU time per bs decode-graph replay (mean of 200), one entry per round",
              "decode_graph_ms": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
