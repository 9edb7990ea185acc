"""Benchmark math as pure functions, so every reported figure is unit-testable.

Serving definitions follow vLLM's `bench serve` (vllm/benchmarks/serve.py, `calculate_metrics`) so that numbers
taken against swiftlm, vLLM, SGLang or TGI are comparable:

* TTFT: request sent -> first chunk that carries a token.
* ITL: gap between consecutive token-carrying chunks; a chunk carrying k tokens contributes k entries of gap/k.
* E2E latency: request sent -> last token-carrying chunk.
* TPOT: (E2E - TTFT) / (output_tokens - 1), only for requests with more than one output token.
* Throughputs divide totals over *successful* requests by the wall-clock duration of the whole run.
* Percentiles use numpy's linear interpolation (np.percentile defaults), as vLLM does.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (90, 99)


@dataclass
class RequestRecord:
    """Client-side measurements of one streamed request; times are seconds on the time.perf_counter clock."""

    success: bool
    start_time: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    error_detail: str = ""
    finish_reason: str | None = None

    @property
    def end_time(self) -> float:
        return self.start_time + self.latency


@dataclass
class LatencyStats:
    """Summary of one latency distribution, in milliseconds; None where there were no samples."""

    mean: float | None
    median: float | None
    std: float | None
    p90: float | None
    p99: float | None
    count: int

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> LatencyStats:
        if len(values) == 0:
            return cls(None, None, None, None, None, 0)
        ms = np.asarray(values, dtype=np.float64) * 1000.0
        p90, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return cls(float(ms.mean()), float(np.median(ms)), float(ms.std()), p90, p99, len(ms))


@dataclass
class ServeMetrics:
    """Everything `bench serve` reports for one run (one concurrency level)."""

    duration_s: float
    completed: int
    failed: int
    failure_reasons: dict[str, int]
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats

    def flat(self) -> dict[str, float | int | None]:
        """Scalar figures keyed like vLLM's result JSON (`mean_ttft_ms`, `p99_itl_ms`, ...), for tables and compare."""
        out: dict[str, float | int | None] = {}
        for key, value in asdict(self).items():
            if key == "failure_reasons":
                continue
            if isinstance(value, dict):
                for stat, v in value.items():
                    if stat != "count":
                        out[f"{stat}_{key}_ms"] = v
            else:
                out[key] = value
        return out


def split_gap(gap: float, num_tokens: int) -> list[float]:
    """ITL entries for a chunk that delivered `num_tokens` tokens `gap` seconds after the previous one.

    Spreading the gap evenly keeps the ITL sample count equal to the token count (SGLang/vLLM convention), so
    engines that batch tokens into chunks are not rewarded with fewer, larger samples.
    """
    if num_tokens <= 0:
        return []
    return [gap / num_tokens] * num_tokens


def time_per_output_token(latency: float, ttft: float, output_tokens: int) -> float | None:
    """TPOT = (E2E - TTFT) / (output_tokens - 1); undefined for single-token outputs."""
    if output_tokens <= 1:
        return None
    return (latency - ttft) / (output_tokens - 1)


def peak_concurrency(intervals: Iterable[tuple[float, float]]) -> int:
    """Largest number of overlapping half-open [start, end) intervals (sweep line, ends before starts on ties)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def max_tokens_per_second(records: Sequence[RequestRecord]) -> float:
    """Peak output tokens landing in any one-second bucket since the first successful request started."""
    ok = [r for r in records if r.success]
    if not ok:
        return 0.0
    origin = min(r.start_time for r in ok)
    buckets: Counter[int] = Counter()
    for r in ok:
        t = r.start_time + r.ttft
        buckets[int(t - origin)] += 1
        for gap in r.itl:
            t += gap
            buckets[int(t - origin)] += 1
    return float(max(buckets.values()))


def compute_serve_metrics(records: Sequence[RequestRecord], duration_s: float) -> ServeMetrics:
    """Aggregate per-request records into the run's figures (see module docstring for definitions)."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    ok = [r for r in records if r.success]
    failed = [r for r in records if not r.success]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [t for r in ok if (t := time_per_output_token(r.latency, r.ttft, r.output_tokens)) is not None]
    return ServeMetrics(
        duration_s=duration_s,
        completed=len(ok),
        failed=len(failed),
        failure_reasons=dict(Counter(r.error or "unknown" for r in failed).most_common()),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        max_output_tokens_per_s=max_tokens_per_second(ok),
        max_concurrent_requests=peak_concurrency([(r.start_time, r.end_time) for r in ok]),
        ttft=LatencyStats.of_seconds([r.ttft for r in ok]),
        tpot=LatencyStats.of_seconds(tpots),
        itl=LatencyStats.of_seconds([g for r in ok for g in r.itl]),
        e2el=LatencyStats.of_seconds([r.latency for r in ok]),
    )


def poisson_arrival_offsets(num: int, rate: float, rng: np.random.Generator) -> list[float]:
    """Send times (seconds after start) of `num` requests arriving as a Poisson process of `rate` req/s.

    As in vLLM, the cumulative gaps are rescaled so the last arrival lands at num/rate: runs with different seeds
    then offer the same average load. An infinite rate sends everything at t=0.
    """
    if num <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * num
    if rate <= 0:
        raise ValueError(f"request rate must be positive, got {rate}")
    offsets = np.cumsum(rng.exponential(1.0 / rate, size=num))
    offsets *= (num / rate) / offsets[-1]
    return [float(x) for x in offsets]


# ---- offline latency / roofline ----------------------------------------------------------------------------------

def decode_time_per_token(full_s: float, prefill_s: float, output_len: int) -> float:
    """Decode step time estimated from a max_tokens=1 run (prefill + first token) and a full-length run."""
    if output_len < 2:
        raise ValueError("decode time needs output_len >= 2")
    return (full_s - prefill_s) / (output_len - 1)


def causal_keys_attended(seq_len: int) -> int:
    """Query-key pairs a causal prefill of `seq_len` tokens scores: 1 + 2 + ... + seq_len."""
    return seq_len * (seq_len + 1) // 2


def prefill_flops(dense_params: int, lm_head_params: int, num_layers: int, num_heads: int, head_dim: int,
                  input_len: int, batch_size: int) -> float:
    """Matmul FLOPs of prefilling `batch_size` sequences of `input_len` tokens.

    2 FLOPs per weight per token for every non-embedding weight (`dense_params`); the LM head only runs on the
    last position of each sequence; attention costs 4*H*D per (query, key) pair per layer (QK^T and PV).
    """
    tokens = input_len * batch_size
    attention = 4 * num_layers * num_heads * head_dim * causal_keys_attended(input_len) * batch_size
    return 2.0 * dense_params * tokens + 2.0 * lm_head_params * batch_size + attention


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """KV-cache bytes one token occupies (K and V, every layer)."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


@dataclass
class Roofline:
    """Lower bounds on step times from the measured device peaks, and how far the measured times are above them."""

    prefill_floor_s: float
    decode_floor_s: float
    prefill_ratio: float | None
    decode_ratio: float | None


def roofline(flops: float, prefill_bytes: float, decode_bytes: float, matmul_flops_per_s: float,
             bandwidth_bytes_per_s: float, measured_prefill_s: float | None,
             measured_decode_s: float | None) -> Roofline:
    """Prefill is bounded by max(compute, one weight read); a decode step by reading weights plus KV once.

    Ratios are measured / floor: 1.0 would be at the roofline, 2.0 means twice as slow as the bound.
    """
    prefill_floor = max(flops / matmul_flops_per_s, prefill_bytes / bandwidth_bytes_per_s)
    decode_floor = decode_bytes / bandwidth_bytes_per_s
    return Roofline(
        prefill_floor_s=prefill_floor,
        decode_floor_s=decode_floor,
        prefill_ratio=measured_prefill_s / prefill_floor if measured_prefill_s and prefill_floor > 0 else None,
        decode_ratio=measured_decode_s / decode_floor if measured_decode_s and decode_floor > 0 else None,
    )
