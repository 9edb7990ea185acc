"""Where a step's time goes (GPU kernels vs host work) for batch-1 decode and a 512-token prefill.

    PYTHONPATH=$PWD python benchmarks/profile_engine.py --model benchmarks/models/qwen3-8b
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from swiftlm import SamplingParams
from swiftlm.engine.llm import LLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/qwen3-8b")
    args = ap.parse_args()
    llm = LLM(args.model, load_format="dummy", max_num_seqs=64)
    engine, runner = llm.engine, llm.engine.model_runner
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=10_000, ignore_eos=True, temperature=0.0)
    for _ in range(2):
        engine.add_request(f"w{_}", torch.randint(1000, 30000, (512,), generator=gen).tolist(), params)
        for _ in range(20):
            engine.step()
        engine.abort_request(f"w{_}")
        engine.step()
    # GPU time of one bs=1 decode graph replay vs a whole engine step.
    engine.add_request("d", torch.randint(1000, 30000, (512,), generator=gen).tolist(), params)
    engine.step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(100):
        runner.graphs[1].replay()
    end.record()
    torch.cuda.synchronize()
    replay_ms = start.elapsed_time(end) / 100
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(100):
        engine.step()
    step_ms = (time.perf_counter() - t) * 10
    print(f"bs=1 decode: graph replay {replay_ms:.3f} ms GPU, engine.step {step_ms:.3f} ms wall")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    engine.abort_request("d")
    engine.step()
    engine.add_request("p", torch.randint(1000, 30000, (512,), generator=gen).tolist(),
                       SamplingParams(max_tokens=1, ignore_eos=True))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
    print(f"prefill 512: step wall {wall:.2f} ms")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
