"""Where a step's time goes, for batch-1 decode, 512- and 8000-token prefills and the offline throughput workload.

Times engine phases (schedule / model runner / output processing) by wrapping them, and the GPU time of
one bs=1 decode graph replay with CUDA events (also recaptured with programmatic dependent launch flipped),
then prints a torch.profiler table per case (GPU kernels for the decode graph and the 8000-token prefill,
host and GPU for the 512-token one), and the Triton JIT compiles of start-up and of the throughput run.

    PYTHONPATH=$PWD python benchmarks/profile_engine.py --model benchmarks/models/qwen3-8b
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import pstats
import tempfile
import time
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from swiftlm import SamplingParams
from swiftlm.engine.llm import LLM
from swiftlm.kernels.triton_support import set_pdl, use_pdl

PHASES: dict[str, float] = collections.defaultdict(float)


def timed(name: str, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            PHASES[name] += time.perf_counter() - t
    return wrapper


def watch_compiles() -> list[tuple[str, float]]:
    """From now on, (kernel, seconds) of every Triton JIT compile (disk-cache hits included): a compile in a timed
    section is host time the GPU waits through. Returns the live list (empty where Triton has no hooks)."""
    events: list[tuple[str, float]] = []
    try:
        from triton import knobs
    except ImportError:
        return events
    started: dict[str, float] = {}

    def before(**kw) -> bool:
        started[kw["repr"]] = time.perf_counter()
        return False

    def after(**kw) -> None:
        events.append((kw["repr"], time.perf_counter() - started.pop(kw["repr"], time.perf_counter())))

    knobs.runtime.jit_cache_hook = before
    knobs.runtime.jit_post_compile_hook = after
    return events


def compile_report(events: list[tuple[str, float]], since: int, label: str) -> None:
    new = events[since:]
    print(f"{label}: {len(new)} Triton compiles, {sum(t for _, t in new):.2f} s")
    for name, seconds in new[:12]:
        print(f"  {seconds:6.2f} s  {name[:200]}")


def gpu_idle_report(prof: profile, label: str) -> None:
    """Where the GPU waits inside the profiled `engine.step` region: before its first kernel, between kernels
    (the largest gaps with the kernels around them) and after its last one, from the profiler's trace."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    step = max((e for e in events if e.get("name") == "engine.step" and e.get("ph") == "X"), key=lambda e: e["dur"])
    work = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                  if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and e.get("ph") == "X")
    gaps, end, busy = [], work[0][1], work[0][1] - work[0][0]
    for (start, stop, name), previous in zip(work[1:], work):
        if start > end:
            gaps.append((start - end, previous[2][:40], name[:40]))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    gaps.sort(reverse=True)
    print(f"{label}: step {step['dur'] / 1e3:.2f} ms, GPU busy {busy / 1e3:.2f} ms; idle before the first kernel "
          f"{(work[0][0] - step['ts']) / 1e3:.2f} ms, between kernels {sum(g for g, *_ in gaps) / 1e3:.2f} ms "
          f"({len(gaps)} gaps), after the last {(step['ts'] + step['dur'] - end) / 1e3:.2f} ms; largest gaps (us): "
          + "; ".join(f"{g:.0f} {a} -> {b}" for g, a, b in gaps[:6]))


def host_report(engine, prompt: list[int]) -> None:
    """Host functions of one 8000-token prefill step by own and cumulative time (cProfile): a long prefill runs eagerly, and
    where launching its kernels takes longer than running them the GPU waits."""
    engine.add_request("host", prompt, SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0))
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    engine.step()
    profiler.disable()
    torch.cuda.synchronize()
    for order, rows in (("tottime", 25), ("cumulative", 40)):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(rows)
        print(f"prefill 8000, host functions by {order}:")
        print("\n".join(line[:170] for line in text.getvalue().splitlines()[4:]))


def graph_ms(graph: torch.cuda.CUDAGraph, reps: int = 100) -> float:
    """Mean GPU time of one replay."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@torch.inference_mode()
def decode_graph(runner, bs: int) -> torch.cuda.CUDAGraph:
    """A fresh capture of the runner's batch-`bs` decode step on its current inputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        runner._decode_forward(bs)
        with torch.cuda.graph(graph, stream=stream):
            runner._decode_forward(bs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graph


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/qwen3-8b")
    ap.add_argument("--num-prompts", type=int, default=256, help="throughput-run prompts; 0 skips that run")
    ap.add_argument("--quantization", default=None, help="e.g. fp8 (online)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype) or fp8")
    args = ap.parse_args()
    compiles = watch_compiles()
    llm = LLM(args.model, load_format="dummy", max_num_seqs=256, quantization=args.quantization,
              kv_cache_dtype=args.kv_cache_dtype)
    engine, runner = llm.engine, llm.engine.model_runner
    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    runner.execute = timed("execute", runner.execute)
    runner._pack = timed("pack", runner._pack)
    runner.sampler = timed("sampler", runner.sampler)
    engine.step = timed("step", engine.step)
    gen = torch.Generator().manual_seed(0)
    greedy = SamplingParams(max_tokens=10_000, ignore_eos=True, temperature=0.0)

    def ids(n: int) -> list[int]:
        return torch.randint(1000, 30000, (n,), generator=gen).tolist()

    for i in range(2):
        engine.add_request(f"w{i}", ids(512), greedy)
        for _ in range(20):
            engine.step()
        engine.abort_request(f"w{i}")
        engine.step()
    engine.add_request("d", ids(512), greedy)
    engine.step()
    replay_ms = graph_ms(runner.graphs[1])
    pdl = use_pdl(torch.empty(0, device="cuda"))
    set_pdl(not pdl)
    flipped = graph_ms(decode_graph(runner, 1))
    set_pdl(pdl)
    print(f"bs=1 decode graph replay, programmatic dependent launch as configured: {replay_ms:.3f} ms GPU; "
          f"flipped: {flipped:.3f} ms")
    PHASES.clear()
    t = time.perf_counter()
    for _ in range(100):
        engine.step()
    step_ms = (time.perf_counter() - t) * 10
    print(f"bs=1 decode: graph replay {replay_ms:.3f} ms GPU; engine.step {step_ms:.3f} ms wall; phases per step (ms): "
          + ", ".join(f"{k} {v * 10:.3f}" for k, v in PHASES.items()))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.graphs[1].replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=50))
    engine.abort_request("d")
    engine.step()
    for n in (512, 8000):
        for rep in range(3):
            engine.add_request(f"p{n}-{rep}", ids(n), SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0))
            PHASES.clear()
            torch.cuda.synchronize()
            t = time.perf_counter()
            while not engine.step():  # under asynchronous scheduling the token is read by a later step
                pass
            wall = (time.perf_counter() - t) * 1e3
        print(f"prefill {n}: step wall {wall:.2f} ms; phases (ms): "
              + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in PHASES.items()))
    engine.add_request("p8000", ids(8000), SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("engine.step"):
            engine.step()
            torch.cuda.synchronize()
    gpu_idle_report(prof, "prefill 8000")
    host_report(engine, ids(8000))
    print("prefill 8000, GPU kernels:")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
    engine.add_request("p", ids(512), SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=50))
    compile_report(compiles, 0, "start-up and the latency cases")
    if args.num_prompts:
        before = len(compiles)
        throughput_run(llm, ids, args.num_prompts)
        compile_report(compiles, before, "throughput run")


def throughput_run(llm: LLM, ids: Callable[[int], list[int]], num_prompts: int) -> None:
    """Offline num_prompts x (1024 in / 256 out): wall time, step mix, wall and GPU seconds per step kind (GPU:
    CUDA events around the model runner's launches; a step's wall time is the host's, which under asynchronous
    scheduling overlaps the step before on the GPU), engine phases, and
    the GPU kernels of one mixed step (the 5th) and one decode step (the 100th)."""
    engine = llm.engine
    runner = engine.model_runner
    PHASES.clear()
    steps: collections.Counter = collections.Counter()
    seconds: collections.Counter = collections.Counter()
    gpu: collections.Counter = collections.Counter()
    kind = [""]
    timings: list[tuple[str, int, torch.cuda.Event, torch.cuda.Event]] = []  # kind, mixed_log index, events
    profiling: list[profile] = []
    mixed_log: list[str] = []  # per mixed step: one-token rows + prompt tokens, GPU ms
    decode_rows: list[int] = []  # per decode step: its batch size
    orig_schedule, orig_step, orig_execute = engine.scheduler.schedule, engine.step, runner.execute

    def count(*a, **k):
        out = orig_schedule(*a, **k)
        kind[0] = "decode" if out.decode_only else "mixed"
        steps[kind[0]] += 1
        steps["tokens"] += out.num_tokens
        if kind[0] == "decode":
            decode_rows.append(len(out.scheduled))
        if kind[0] == "mixed":
            ones = sum(1 for item in out.scheduled if item.num_new_tokens == 1)
            mixed_log.append(f"{ones}+{out.num_tokens - ones}")
        if steps[kind[0]] == {"mixed": 5, "decode": 100}[kind[0]]:
            profiling.append(profile(activities=[ProfilerActivity.CUDA]))
            profiling[0].__enter__()
        return out

    def execute(*a, **k):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = orig_execute(*a, **k)
        end.record()
        index = len(mixed_log) - 1 if kind[0] == "mixed" else len(decode_rows) - 1
        timings.append((kind[0], index, start, end))
        return out

    def step(*a, **k):
        t0 = time.perf_counter()
        try:
            return orig_step(*a, **k)
        finally:
            if profiling:
                torch.cuda.synchronize()
                prof = profiling.pop()
                prof.__exit__(None, None, None)
                print(f"throughput run, {kind[0]} step {steps[kind[0]]}, GPU kernels:")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=60))
            seconds[kind[0]] += time.perf_counter() - t0
    engine.scheduler.schedule = count
    engine.step = step
    runner.execute = execute
    t = time.perf_counter()
    llm.generate([ids(1024) for _ in range(num_prompts)], SamplingParams(max_tokens=256, ignore_eos=True,
                                                                      temperature=0.0), use_tqdm=False)
    total = time.perf_counter() - t
    torch.cuda.synchronize()  # read the step timings only now: a sync per step would stall asynchronous scheduling
    by_batch: dict[int, list[float]] = collections.defaultdict(list)  # decode batch bucket of 32 -> GPU ms
    for step_kind, index, start, end in timings:
        ms = start.elapsed_time(end)
        gpu[step_kind] += ms / 1e3
        if step_kind == "mixed":
            mixed_log[index] += f":{ms:.0f}"
        else:
            by_batch[(decode_rows[index] - 1) // 32 * 32 + 32].append(ms)
    print(f"throughput run: {total:.2f} s, {num_prompts * 256 / total:.0f} out tok/s, steps {dict(steps)}; "
          f"step wall s by kind: {', '.join(f'{k} {v:.2f}' for k, v in seconds.items())}; "
          f"GPU s (runner start to sampler end) by kind: {', '.join(f'{k} {v:.2f}' for k, v in gpu.items())}; "
          "phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in PHASES.items()))
    print("mixed steps (one-token rows + prompt tokens: GPU ms): " + " ".join(mixed_log))
    print(f"preemptions {engine.scheduler.num_preemptions}; decode steps by batch (up to: steps, mean GPU ms): "
          + ", ".join(f"{b}: {len(v)}, {sum(v) / len(v):.1f}" for b, v in sorted(by_batch.items())))


if __name__ == "__main__":
    main()
