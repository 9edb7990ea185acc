"""`swiftlm` command line: serve (default), generate, bench, make-checkpoint."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from swiftlm.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, named as vLLM names them."""
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the embedded demo model)")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--dtype", default=d.dtype, help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    g.add_argument("--device", default=d.device, help="auto, cuda, cuda:N or cpu")
    g.add_argument("--load-format", default=d.load_format, choices=["auto", "safetensors", "dummy"],
                   help="dummy: random weights made on the device (for benchmarks with a config-only directory)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    g.add_argument("--num-kv-blocks", type=int, default=None, help="override the KV cache size in blocks")
    g.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    g.add_argument("--quantization", default=None, help="fp8: quantize a bf16 checkpoint to FP8 at load time")
    g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype)
    g.add_argument("--revision", default=None)
    g.add_argument("--expert-stats", action="store_true", help="count tokens routed to each MoE expert")
    g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                   help="read each step's tokens before scheduling the next (the GPU idles while Python runs)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    names = {f.name for f in dataclasses.fields(EngineConfig)} - {"extra", "tensor_parallel_size"}
    return EngineConfig(**{n: getattr(args, n) for n in names if hasattr(args, n)})


def _generate(args: argparse.Namespace) -> int:
    from swiftlm.engine.llm import LLM
    from swiftlm.sampling_params import SamplingParams
    config = engine_config_from_args(args)
    llm = LLM(**dataclasses.asdict(config) | {"extra": {}})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed, ignore_eos=args.ignore_eos)
    prompts = args.prompt or ["Hello, my name is"]
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        print(json.dumps({"prompt": prompt, "text": out.text, "finish_reason": out.finish_reason,
                          "num_output_tokens": out.num_output_tokens}, ensure_ascii=False))
    return 0


def _make_checkpoint(args: argparse.Namespace) -> int:
    from swiftlm.testing import make_random_checkpoint
    path = make_random_checkpoint(args.config, args.output, dtype=args.dtype, seed=args.seed, device=args.device)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swiftlm", description="Fast inference and serving for Qwen models")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (the default command)")
    add_engine_args(serve)
    from swiftlm.server import add_serve_arguments, serve as run_serve
    add_serve_arguments(serve)
    serve.set_defaults(func=lambda a: run_serve(a, engine_config_from_args(a)))

    gen = sub.add_parser("generate", help="offline generation for a few prompts")
    add_engine_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.set_defaults(func=_generate)

    mk = sub.add_parser("make-checkpoint", help="write a random-weight HF checkpoint for a config.json")
    mk.add_argument("--config", required=True, help="config.json path or a directory holding one")
    mk.add_argument("--output", required=True)
    mk.add_argument("--dtype", default="bfloat16")
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--device", default="cpu", help="where random values are drawn: cuda writes a large "
                    "checkpoint much faster; values then differ from the cpu's (which are the same on every machine)")
    mk.set_defaults(func=_make_checkpoint)

    from swiftlm.bench.cli import add_bench_subparsers
    add_bench_subparsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["serve", *argv]
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)
