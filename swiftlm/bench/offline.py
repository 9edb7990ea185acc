"""`bench latency` and `bench throughput`: offline runs through `swiftlm.LLM`, with a roofline for latency.

Functions take an already built LLM-like object (anything with `generate` and an `engine`), so the timing logic is
testable with a fake and the CLI alone decides how the real engine is constructed.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from swiftlm.bench.datasets import SampleRequest, random_requests, token_pool
from swiftlm.bench.metrics import (
    LatencyStats,
    Roofline,
    decode_time_per_token,
    kv_bytes_per_token,
    prefill_flops,
    roofline,
)


class GeneratesText(Protocol):
    """The slice of swiftlm.LLM the offline benchmarks use."""

    engine: Any

    def generate(self, prompts: Any, params: Any = ..., use_tqdm: bool = ...) -> list[Any]: ...


def _sampling_params(max_tokens: int, temperature: float) -> Any:
    from swiftlm.sampling_params import SamplingParams

    return SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True, temperature=temperature)


def _first_attr(obj: Any, paths: Sequence[str]) -> Any:
    """First existing attribute among dotted `paths`; the engine's layout is not pinned down, so look around."""
    for path in paths:
        cur = obj
        for name in path.split("."):
            cur = getattr(cur, name, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    return None


def _model(llm: GeneratesText) -> torch.nn.Module | None:
    return _first_attr(llm, ["engine.model_runner.model", "engine.model"])


def _hf_config(llm: GeneratesText) -> Any:
    return _first_attr(llm, ["engine.hf_config", "engine.model_config", "engine.model_runner.hf_config",
                             "engine.model_runner.model.config", "engine.model.config"])


def _cfg_value(cfg: Any, key: str) -> Any:
    """A field of an HF config given either as a dict (swiftlm's engine) or as a PretrainedConfig-like object."""
    if cfg is None:
        return None
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def vocab_size(llm: GeneratesText) -> int | None:
    """Vocabulary size so random prompt ids stay valid even for tiny test models."""
    size = _first_attr(llm, ["engine.vocab_size"]) or _cfg_value(_hf_config(llm), "vocab_size")
    if size:
        return int(size)
    tok = _first_attr(llm, ["engine.tokenizer"])
    return len(tok) if tok is not None else None


@dataclass
class ModelCost:
    """Bytes and parameter counts that feed the roofline; `notes` says what had to be guessed."""

    weight_bytes: int
    untied_embedding_bytes: int
    dense_params: int
    lm_head_params: int
    num_layers: int | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    kv_dtype_bytes: int
    notes: list[str] = field(default_factory=list)


def model_cost(llm: GeneratesText) -> ModelCost:
    """Weight bytes (engine's own count if it has one) and params split into embedding / LM head / the rest.

    An untied input embedding is only gathered row by row, so it is left out of the bytes a decode step must read.
    """
    notes: list[str] = []
    model = _model(llm)
    params = list(model.named_parameters()) if model is not None else []
    engine_bytes = getattr(getattr(llm, "engine", None), "model_weight_bytes", None)
    if callable(engine_bytes):
        weight_bytes = int(engine_bytes())
    else:
        weight_bytes = sum(p.numel() * p.element_size() for _, p in params)
        notes.append("weight bytes summed from model parameters")
    embed = [p for n, p in params if "embed_tokens" in n]
    head = [p for n, p in params if "lm_head" in n]
    embed_params = sum(p.numel() for p in embed)
    head_params = sum(p.numel() for p in head) or embed_params
    dense = sum(p.numel() for _, p in params) - embed_params - sum(p.numel() for p in head)
    untied = sum(p.numel() * p.element_size() for p in embed) if head else 0
    cfg = _hf_config(llm)
    layers = _cfg_value(cfg, "num_hidden_layers")
    heads = _cfg_value(cfg, "num_attention_heads")
    kv_heads = _cfg_value(cfg, "num_key_value_heads") or heads
    hidden = _cfg_value(cfg, "hidden_size")
    head_dim = _cfg_value(cfg, "head_dim") or (hidden // heads if heads and hidden else None)
    if cfg is None:
        notes.append("model config not found: attention FLOPs and KV bytes left out")
    if model is None:
        notes.append("model module not found: parameter counts are zero")
    kv_dtype = next((p.element_size() for _, p in params if p.is_floating_point()), 2)
    return ModelCost(weight_bytes, untied, dense, head_params, layers, heads, kv_heads, head_dim, kv_dtype, notes)


@dataclass
class DevicePeaks:
    """What this device actually sustains, measured on the spot rather than taken from a datasheet."""

    bandwidth_bytes_per_s: float
    matmul_flops_per_s: float
    device_name: str


def _cuda_time(fn: Callable[[], object], iters: int) -> float:
    """Seconds per call of `fn` on the current CUDA stream, after one warmup call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / iters


def measure_device_peaks(nbytes: int = 1 << 30, n: int = 8192) -> DevicePeaks | None:
    """HBM bandwidth from a large device-to-device copy (bytes read + written), bf16 rate from an n^3 torch.mm.

    Returns None without CUDA: a CPU has no meaningful roofline for this engine.
    """
    if not torch.cuda.is_available():
        return None
    dev = torch.device("cuda")
    peaks = DevicePeaks(2 * nbytes / _copy_time(nbytes, dev), 2 * n ** 3 / _matmul_time(n, dev),
                        torch.cuda.get_device_name(dev))
    torch.cuda.empty_cache()
    return peaks


def _copy_time(nbytes: int, dev: torch.device) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return _cuda_time(lambda: dst.copy_(src), 20)


def _matmul_time(n: int, dev: torch.device) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=dev)
    return _cuda_time(lambda: torch.mm(a, b), 10)


@dataclass
class LatencyConfig:
    input_len: int = 8000
    output_len: int = 500
    batch_size: int = 1
    num_iters: int = 10
    num_iters_warmup: int = 2
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 2 or self.batch_size < 1 or self.num_iters < 1:
            raise ValueError("need input_len >= 1, output_len >= 2, batch_size >= 1, num_iters >= 1")


@dataclass
class LatencyResult:
    """Per-iteration timings (seconds) and their summaries; roofline fields are None where not measurable."""

    config: LatencyConfig
    prefill_s: list[float]
    full_s: list[float]
    decode_s_per_token: list[float]
    prefill: LatencyStats
    decode_per_token: LatencyStats
    e2e: LatencyStats
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    cost: ModelCost
    prefill_flops: float | None
    decode_bytes_per_step: float
    peaks: DevicePeaks | None
    roofline: Roofline | None
    notes: list[str]

    def flat(self) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {
            "input_len": self.config.input_len, "output_len": self.config.output_len,
            "batch_size": self.config.batch_size,
            "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s,
            "weight_bytes": self.cost.weight_bytes, "prefill_flops": self.prefill_flops,
            "decode_bytes_per_step": self.decode_bytes_per_step,
        }
        for name, stats in (("prefill", self.prefill), ("decode_per_token", self.decode_per_token),
                            ("e2e", self.e2e)):
            out.update({f"{k}_{name}_ms": v for k, v in asdict(stats).items() if k != "count"})
        if self.peaks is not None:
            out["hbm_bandwidth_gb_s"] = self.peaks.bandwidth_bytes_per_s / 1e9
            out["bf16_matmul_tflops"] = self.peaks.matmul_flops_per_s / 1e12
        if self.roofline is not None:
            out["prefill_floor_ms"] = self.roofline.prefill_floor_s * 1000
            out["decode_floor_ms_per_token"] = self.roofline.decode_floor_s * 1000
            out["prefill_vs_floor"] = self.roofline.prefill_ratio
            out["decode_vs_floor"] = self.roofline.decode_ratio
        return out


def run_latency(llm: GeneratesText, cfg: LatencyConfig, show_progress: bool = True,
                peaks: DevicePeaks | None = None, clock: Callable[[], float] = time.perf_counter) -> LatencyResult:
    """Time prefill apart from decode: each iteration runs max_tokens=1 (prefill + first token, ~TTFT) and then
    max_tokens=output_len on fresh random prompts (fresh so a prefix cache cannot hide the prefill), and
    decode per token = (full - prefill) / (output_len - 1). `clock` is swappable so tests can run on virtual time."""
    rng = np.random.default_rng(cfg.seed)
    pool = token_pool(None, vocab_size(llm))
    one, full = _sampling_params(1, cfg.temperature), _sampling_params(cfg.output_len, cfg.temperature)

    def batch() -> list[list[int]]:
        return [[int(x) for x in rng.choice(pool, size=cfg.input_len)] for _ in range(cfg.batch_size)]

    def timed(params: Any) -> float:
        prompts = batch()
        t0 = clock()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = clock() - t0
        short = [o for o in outs if len(o.token_ids) != params.max_tokens]
        if short:
            print(f"warning: {len(short)} outputs shorter than max_tokens={params.max_tokens}", file=sys.stderr)
        return elapsed

    for _ in tqdm(range(cfg.num_iters_warmup), desc="warmup", file=sys.stderr, disable=not show_progress):
        timed(one)
        timed(full)
    prefill_s, full_s = [], []
    for _ in tqdm(range(cfg.num_iters), desc="latency", file=sys.stderr, disable=not show_progress):
        prefill_s.append(timed(one))
        full_s.append(timed(full))
    decode = [decode_time_per_token(f, p, cfg.output_len) for f, p in zip(full_s, prefill_s, strict=True)]
    med_prefill, med_decode = float(np.median(prefill_s)), float(np.median(decode))

    cost = model_cost(llm)
    notes = list(cost.notes)
    flops = None
    if cost.num_layers and cost.num_heads and cost.head_dim:
        flops = prefill_flops(cost.dense_params, cost.lm_head_params, cost.num_layers, cost.num_heads,
                              cost.head_dim, cfg.input_len, cfg.batch_size)
    weights = cost.weight_bytes - cost.untied_embedding_bytes
    decode_bytes = float(weights)
    if cost.num_layers and cost.num_kv_heads and cost.head_dim:
        mean_context = cfg.input_len + cfg.output_len / 2
        decode_bytes += cfg.batch_size * mean_context * kv_bytes_per_token(
            cost.num_layers, cost.num_kv_heads, cost.head_dim, cost.kv_dtype_bytes)
    roof = None
    if peaks is None:
        notes.append("no CUDA device: bandwidth / matmul peaks and roofline floors skipped")
    elif flops is None:
        notes.append("prefill FLOPs unknown: roofline skipped")
    else:
        roof = roofline(flops, weights, decode_bytes, peaks.matmul_flops_per_s, peaks.bandwidth_bytes_per_s,
                        med_prefill, med_decode)
    return LatencyResult(
        config=cfg, prefill_s=prefill_s, full_s=full_s, decode_s_per_token=decode,
        prefill=LatencyStats.of_seconds(prefill_s), decode_per_token=LatencyStats.of_seconds(decode),
        e2e=LatencyStats.of_seconds(full_s),
        prefill_tokens_per_s=cfg.batch_size * cfg.input_len / med_prefill,
        decode_tokens_per_s=cfg.batch_size / med_decode if med_decode > 0 else float("inf"),
        cost=cost, prefill_flops=flops, decode_bytes_per_step=decode_bytes, peaks=peaks, roofline=roof, notes=notes,
    )


@dataclass
class ThroughputResult:
    num_requests: int
    elapsed_s: float
    total_prompt_tokens: int
    total_output_tokens: int
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float

    def flat(self) -> dict[str, float | int]:
        return asdict(self)


def encode_requests(requests: Sequence[SampleRequest], tokenizer: Any) -> list[list[int]]:
    """Offline prompts as token ids: text is encoded, chat messages go through the model's chat template."""
    out = []
    for req in requests:
        if isinstance(req.prompt, str):
            out.append(list(tokenizer.encode(req.prompt)))
        elif req.prompt and isinstance(req.prompt[0], dict):
            ids = tokenizer.apply_chat_template(req.prompt, add_generation_prompt=True, tokenize=True)
            out.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
        else:
            out.append(list(req.prompt))
    return out


def throughput_requests(llm: GeneratesText, num: int, input_len: int, output_len: int,
                        seed: int) -> list[SampleRequest]:
    """Random token-id prompts whose ids fit the model's vocabulary."""
    return random_requests(num, input_len, output_len, seed=seed, vocab_size=vocab_size(llm))


def run_throughput(llm: GeneratesText, requests: Sequence[SampleRequest], temperature: float = 1.0,
                   show_progress: bool = True, clock: Callable[[], float] = time.perf_counter) -> ThroughputResult:
    """Submit every prompt at once with ignore_eos (vLLM's offline throughput setup) and time until all finish."""
    prompts = encode_requests(requests, _first_attr(llm, ["engine.tokenizer"]))
    params = [_sampling_params(r.max_tokens, temperature) for r in requests]
    t0 = clock()
    outs = llm.generate(prompts, params, use_tqdm=show_progress)
    elapsed = clock() - t0
    prompt_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(len(o.token_ids) for o in outs)
    return ThroughputResult(len(outs), elapsed, prompt_tokens, output_tokens, len(outs) / elapsed,
                            output_tokens / elapsed, (prompt_tokens + output_tokens) / elapsed)
