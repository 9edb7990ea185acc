"""`swiftlm bench {serve,latency,throughput,reliability,compare}` argument parsing and dispatch.

`swiftlm/cli.py` calls `add_bench_subparsers(subparsers)`; `python -m swiftlm.bench` uses `main()` directly.
Heavy imports (torch, transformers, matplotlib, the engine) happen inside the commands so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# EngineConfig fields the offline commands expose as flags; `seed` is shared with the prompt generator instead.
_ENGINE_SKIP = {"model", "seed", "extra"}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--result-dir", help="write JSON + markdown (+ PNG plots) of the run into this directory")
    p.add_argument("--label", help="name of this run in result files and in `bench compare`")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts and arrival times (default 0)")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bars on stderr")


def _engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per swiftlm.EngineConfig field, generated so new engine knobs show up here without edits.

    Defaults are suppressed: only flags the user gives are passed on, the rest keep the engine's own defaults.
    """
    from swiftlm.config import EngineConfig

    hints = typing.get_type_hints(EngineConfig)
    group = p.add_argument_group("engine options (swiftlm.EngineConfig)")
    for f in dataclasses.fields(EngineConfig):
        if f.name in _ENGINE_SKIP:
            continue
        kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
        kind = kinds[0]
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"(engine default {f.default})")
        elif kind in (int, float, str):
            group.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS,
                               help=f"(engine default {f.default})")


def _add_commands(sub: Any) -> None:
    p = sub.add_parser("serve", help="online benchmark against an OpenAI-compatible server (swiftlm, vLLM, ...)",
                       description="Streams requests to --base-url and reports vLLM-compatible TTFT / TPOT / ITL / "
                                   "E2E and throughput figures, optionally for several concurrency caps in one go.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (default %(default)s)")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", help="model name sent in requests (default: first id from /v1/models)")
    p.add_argument("--tokenizer", help="HF tokenizer path or id; without it random prompts are ids in [1000, 30000)")
    p.add_argument("--dataset", default="random", choices=["random", "jsonl", "shared-prefix"])
    p.add_argument("--dataset-path", help="JSONL file for --dataset jsonl")
    p.add_argument("--random-input-len", type=int, default=1024, help="prompt tokens (suffix for shared-prefix)")
    p.add_argument("--random-output-len", type=int, default=128,
                   help="max_tokens per request; also for JSONL lines without max_tokens")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)] (default 0: fixed)")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens per shared prefix")
    p.add_argument("--num-prefixes", type=int, default=8, help="shared-prefix: distinct prefixes")
    p.add_argument("--num-prompts", type=int, default=200, help="requests per concurrency level")
    p.add_argument("--max-concurrency", help="cap on in-flight requests; a list like 1,2,4,8 runs a sweep")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default inf)")
    p.add_argument("--num-warmups", type=int, default=0, help="unmeasured requests before each level")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos and min_tokens=max_tokens")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: the server's)")
    p.add_argument("--extra-body", help="JSON object merged into every request body")
    p.add_argument("--request-timeout", type=float, default=3600.0, help="seconds per request (default 3600)")
    p.add_argument("--save-detailed", action="store_true", help="also store every request's ITL list in the JSON")
    _common(p)
    p.set_defaults(func=run_bench)

    p = sub.add_parser("latency", help="offline prefill / decode latency of swiftlm.LLM, with a roofline",
                       description="Times a max_tokens=1 generate (prefill) and a full one per iteration; decode "
                                   "per token = (full - prefill) / (output_len - 1). On CUDA, measures HBM bandwidth "
                                   "and bf16 matmul rate on the spot and reports roofline floors.")
    p.add_argument("--model", help="model path or hub id (default: the embedded demo model)")
    p.add_argument("--input-len", type=int, default=8000)
    p.add_argument("--output-len", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=10)
    p.add_argument("--num-iters-warmup", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--no-roofline", action="store_true", help="skip the bandwidth / matmul measurement")
    _common(p)
    _engine_args(p)
    p.set_defaults(func=run_bench)

    p = sub.add_parser("throughput", help="offline max throughput of swiftlm.LLM (all prompts at once)",
                       description="Submits every prompt at once with ignore_eos and reports requests/s, "
                                   "output tok/s, total tok/s.")
    p.add_argument("--model", help="model path or hub id (default: the embedded demo model)")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256, help="max_tokens (JSONL lines may override)")
    p.add_argument("--dataset", default="random", choices=["random", "jsonl"])
    p.add_argument("--dataset-path", help="JSONL file for --dataset jsonl")
    p.add_argument("--temperature", type=float, default=1.0)
    _common(p)
    _engine_args(p)
    p.set_defaults(func=run_bench)

    p = sub.add_parser("reliability", help="many concurrent users; every streamed response checked and accounted",
                       description="N users send short streaming chat requests until --duration; each response must "
                                   "carry a finish_reason, usage, and a token count equal to usage.completion_tokens. "
                                   "429/503 are retried (honoring Retry-After) and counted apart from errors.")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model name (default: first id from /v1/models)")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--duration", type=float, default=120.0, help="seconds during which new requests start")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-words", type=int, default=12)
    p.add_argument("--request-timeout", type=float, default=60.0)
    p.add_argument("--max-retries", type=int, default=5, help="retries of a 429/503 before giving up")
    p.add_argument("--retry-after-cap", type=float, default=10.0, help="longest wait honored, seconds")
    p.add_argument("--think-time", type=float, default=0.0, help="mean pause between a user's requests, seconds")
    p.add_argument("--no-logprobs", action="store_true",
                   help="do not request logprobs (token count check becomes an upper bound)")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (for strict servers)")
    _common(p)
    p.set_defaults(func=run_bench)

    p = sub.add_parser("compare", help="render result JSONs side by side with ratios vs the first",
                       description="Markdown table per result key; later runs show value (x ratio to the first).")
    p.add_argument("results", nargs="+", help="result JSON files; the first is the baseline")
    p.add_argument("--output", help="also write the markdown to this file")
    p.set_defaults(func=run_bench)


def add_bench_subparsers(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` and its five commands on the top-level `swiftlm` subparsers."""
    bench = subparsers.add_parser("bench", help="benchmarks: serve, latency, throughput, reliability, compare",
                                  description="Benchmarks for swiftlm and any OpenAI-compatible server.")
    _add_commands(bench.add_subparsers(dest="bench_command", metavar="{serve,latency,throughput,reliability,compare}"))
    bench.set_defaults(func=run_bench, bench_command=None, _bench_parser=bench)
    return bench


def _finish(args: argparse.Namespace, kind: str, label: str, results: list[dict[str, Any]], markdown: str,
            extra: dict[str, Any] | None = None) -> list[Path]:
    """Print the table; with --result-dir also write JSON + markdown and return the paths (plots come after)."""
    from swiftlm.bench.results import file_stem, make_payload, write_run

    print(markdown)
    if not args.result_dir:
        return []
    args_dict = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    payload = make_payload(kind, label, args_dict, results, extra)
    return write_run(args.result_dir, file_stem(kind, label), payload, markdown)


def _report_paths(paths: Sequence[Path]) -> None:
    for path in paths:
        print(f"wrote {path}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    from swiftlm.bench.client import CHAT, EndpointConfig, resolve_model
    from swiftlm.bench.datasets import build_requests, load_tokenizer
    from swiftlm.bench.results import plot_serve, serve_markdown, serve_results
    from swiftlm.bench.serve import parse_concurrency_list, run_serve

    levels = parse_concurrency_list(args.max_concurrency)
    extra_body = json.loads(args.extra_body) if args.extra_body else {}
    if not isinstance(extra_body, dict):
        raise TypeError("--extra-body must be a JSON object")
    model = resolve_model(args.base_url, args.model)
    cfg = EndpointConfig(base_url=args.base_url, model=model, endpoint=args.endpoint, temperature=args.temperature,
                         ignore_eos=args.ignore_eos, extra_body=extra_body, request_timeout=args.request_timeout)
    requests = build_requests(args.dataset, args.num_prompts, chat=args.endpoint == CHAT,
                              tokenizer=load_tokenizer(args.tokenizer), seed=args.seed,
                              input_len=args.random_input_len, output_len=args.random_output_len,
                              range_ratio=args.random_range_ratio, dataset_path=args.dataset_path,
                              prefix_len=args.prefix_len, num_prefixes=args.num_prefixes)
    levels_out = run_serve(cfg, requests, levels, args.request_rate, args.seed, args.num_warmups,
                           not args.disable_tqdm)
    results = serve_results(levels_out, args.save_detailed)
    label = args.label or Path(model).name
    paths = _finish(args, "serve", label, results, serve_markdown(label, results),
                    {"model": model, "url": cfg.url, "num_requests": len(requests)})
    if paths:
        paths += plot_serve(results, paths[0].parent, paths[0].stem)
    _report_paths(paths)
    return 0 if any(level.metrics.completed for level in levels_out) else 1


def _model_label(model: str | None) -> str:
    return Path(model).name if model else "demo"


def _build_llm(args: argparse.Namespace) -> Any:
    from swiftlm import LLM
    from swiftlm.config import EngineConfig

    engine_kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
                     if f.name not in _ENGINE_SKIP and hasattr(args, f.name)}
    return LLM(model=args.model, seed=args.seed, **engine_kwargs)


def _latency(args: argparse.Namespace) -> int:
    from swiftlm.bench.offline import LatencyConfig, measure_device_peaks, run_latency
    from swiftlm.bench.results import metrics_markdown

    cfg = LatencyConfig(input_len=args.input_len, output_len=args.output_len, batch_size=args.batch_size,
                        num_iters=args.num_iters, num_iters_warmup=args.num_iters_warmup,
                        temperature=args.temperature, seed=args.seed)
    # Measured before the engine claims its KV-cache memory, so the probe buffers always fit.
    peaks = None if args.no_roofline else measure_device_peaks()
    result = run_latency(_build_llm(args), cfg, not args.disable_tqdm, peaks)
    label = args.label or _model_label(args.model)
    key = f"batch={cfg.batch_size},input={cfg.input_len},output={cfg.output_len}"
    results = [{"key": key, "metrics": result.flat(), "prefill_s": result.prefill_s, "full_s": result.full_s,
                "decode_s_per_token": result.decode_s_per_token, "model_cost": dataclasses.asdict(result.cost),
                "device": result.peaks.device_name if result.peaks else None, "notes": result.notes}]
    _report_paths(_finish(args, "latency", label, results,
                          metrics_markdown(f"bench latency: {label}", results, result.notes)))
    return 0


def _throughput(args: argparse.Namespace) -> int:
    from swiftlm.bench.datasets import SampleRequest, read_jsonl
    from swiftlm.bench.offline import run_throughput, throughput_requests
    from swiftlm.bench.results import metrics_markdown

    llm = _build_llm(args)
    if args.dataset == "jsonl":
        if not args.dataset_path:
            raise ValueError("--dataset jsonl needs --dataset-path")
        rows = read_jsonl(args.dataset_path)
        requests = [SampleRequest(prompt=p, prompt_len=None, max_tokens=m or args.output_len)
                    for p, m in (rows[i % len(rows)] for i in range(args.num_prompts))]
    else:
        requests = throughput_requests(llm, args.num_prompts, args.input_len, args.output_len, args.seed)
    result = run_throughput(llm, requests, args.temperature, not args.disable_tqdm)
    label = args.label or _model_label(args.model)
    key = f"prompts={result.num_requests}" + (f",input={args.input_len},output={args.output_len}"
                                              if args.dataset == "random" else f",dataset={args.dataset_path}")
    results = [{"key": key, "metrics": result.flat()}]
    _report_paths(_finish(args, "throughput", label, results, metrics_markdown(f"bench throughput: {label}", results)))
    return 0


def _reliability(args: argparse.Namespace) -> int:
    from swiftlm.bench.client import resolve_model
    from swiftlm.bench.reliability import ReliabilityConfig, run_reliability
    from swiftlm.bench.results import metrics_markdown, plot_cdf

    model = resolve_model(args.base_url, args.model)
    cfg = ReliabilityConfig(base_url=args.base_url, model=model, users=args.users, duration_s=args.duration,
                            max_tokens=args.max_tokens, prompt_words=args.prompt_words,
                            request_timeout=args.request_timeout, max_retries=args.max_retries,
                            retry_after_cap=args.retry_after_cap, think_time=args.think_time,
                            logprobs=not args.no_logprobs, ignore_eos=not args.no_ignore_eos, seed=args.seed)
    report = run_reliability(cfg, not args.disable_tqdm)
    label = args.label or Path(model).name
    results = [{"key": f"users={cfg.users},duration={cfg.duration_s:g}s", "metrics": report.flat(),
                "errors": report.errors, "attempt_outcomes": report.attempt_outcomes,
                "token_check": report.token_check, "latencies_s": report.latencies_s}]
    notes = [f"errors: {report.errors or 'none'}", f"HTTP attempts: {report.attempt_outcomes}",
             f"token count check: {report.token_check}"]
    paths = _finish(args, "reliability", label, results,
                    metrics_markdown(f"bench reliability: {label}", results, notes), {"model": model})
    if paths:
        paths.append(plot_cdf(report.latencies_s, paths[0].with_name(paths[0].stem + "-cdf.png"),
                              f"Latency CDF, {cfg.users} users"))
    _report_paths(paths)
    return 0 if report.completed == report.requests_sent and report.lost == 0 else 1


def _compare(args: argparse.Namespace) -> int:
    from swiftlm.bench.results import compare_markdown, load_runs

    runs, labels = load_runs(args.results)
    text = compare_markdown(runs, labels)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


_COMMANDS = {"serve": _serve, "latency": _latency, "throughput": _throughput, "reliability": _reliability,
             "compare": _compare}


def run_bench(args: argparse.Namespace) -> int:
    """Entry point set as `args.func`: runs the chosen bench command and returns the process exit code."""
    if args.bench_command is None:
        args._bench_parser.print_help()
        return 2
    return _COMMANDS[args.bench_command](args)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m swiftlm.bench <command> ...`."""
    parser = argparse.ArgumentParser(prog="python -m swiftlm.bench",
                                     description="Benchmarks for swiftlm and any OpenAI-compatible server.")
    _add_commands(parser.add_subparsers(dest="bench_command", required=True,
                                        metavar="{serve,latency,throughput,reliability,compare}"))
    args = parser.parse_args(argv)
    return args.func(args)
