"""`bench reliability`: many simulated users hammer a server for a bounded time; every response is checked whole.

The point is accounting, not speed: every request that is sent ends in exactly one bucket (completed, or one named
failure), so a server that silently drops, truncates or miscounts a stream cannot look healthy.
"""
from __future__ import annotations

import asyncio
import email.utils
import random
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from swiftlm.bench.client import CHAT, StreamResult, join_url, stream_once
from swiftlm.bench.datasets import WORDS

OK = "ok"
REJECTED = "rejected"
REJECTED_RETRIED = "rejected (retried)"
REJECTED_GAVE_UP = "rejected (retries exhausted)"
CANCELLED = "cancelled at shutdown"
REJECT_STATUSES = (429, 503)


@dataclass
class ReliabilityConfig:
    """Load shape and checks. `ignore_eos` makes every answer exactly `max_tokens` long, which the check then
    verifies; `logprobs` makes the streamed token count exact (else it is only an upper-bound check)."""

    base_url: str
    model: str
    users: int = 1000
    duration_s: float = 120.0
    max_tokens: int = 16
    prompt_words: int = 12
    request_timeout: float = 60.0
    max_retries: int = 5
    retry_after_cap: float = 10.0
    think_time: float = 0.0
    logprobs: bool = True
    ignore_eos: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.users < 1 or self.duration_s <= 0 or self.max_tokens < 1 or self.request_timeout <= 0:
            raise ValueError("users, duration, max_tokens and request_timeout must be positive")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    @property
    def hard_stop_s(self) -> float:
        """Worst case for the last request started before the deadline: every retry times out and waits the cap."""
        return (self.duration_s + (self.max_retries + 1) * self.request_timeout
                + self.max_retries * self.retry_after_cap + 5.0)


def check_response(result: StreamResult, cfg: ReliabilityConfig) -> str:
    """Classify one HTTP attempt: OK, REJECTED (429/503, retryable) or the name of what was wrong with it."""
    if result.status in REJECT_STATUSES:
        return REJECTED
    if result.error is not None:
        return result.error
    acc = result.acc
    if acc.error is not None:
        return acc.error
    if not acc.terminated:
        return "truncated stream"
    if acc.finish_reason is None:
        return "missing finish_reason"
    if acc.usage is None or acc.usage.get("completion_tokens") is None:
        return "missing usage"
    reported = int(acc.usage["completion_tokens"])
    counted = acc.tokens_counted
    if counted == 0:
        return "no tokens received"
    if acc.exact_counts:
        # A server may not stream the EOS/stop token it counts; that one-token gap is legitimate only on "stop".
        allowed = {reported} | ({reported - 1} if acc.finish_reason == "stop" else set())
        if counted not in allowed:
            return "token count mismatch"
    elif counted > reported:
        return "token count mismatch"
    if cfg.ignore_eos and acc.finish_reason == "length" and reported != cfg.max_tokens:
        return "wrong output length"
    return OK


def retry_delay(retry_after: str | None, attempt: int, cap: float) -> float:
    """Honor Retry-After (seconds or HTTP date), else exponential backoff from 50 ms; never above `cap`."""
    if retry_after:
        try:
            seconds: float | None = float(retry_after)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
            except (TypeError, ValueError):
                seconds = None
        if seconds is not None:
            return min(max(seconds, 0.0), cap)
    return min(0.05 * 2 ** attempt, cap)


@dataclass
class Tally:
    """Counters with an audit: `started` must equal the sum of outcomes, for requests and for HTTP attempts."""

    requests_started: int = 0
    attempts_started: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    attempts: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)


@dataclass
class ReliabilityReport:
    """What `bench reliability` reports; `lost` counts requests that reached no bucket and must be 0."""

    users: int
    duration_s: float
    wall_s: float
    requests_sent: int
    completed: int
    failed: int
    lost: int
    success_rate: float
    errors: dict[str, int]
    http_attempts: int
    attempt_outcomes: dict[str, int]
    rejected_retried: int
    requests_per_s: float
    p50_latency_ms: float | None
    p99_latency_ms: float | None
    p50_ttft_ms: float | None
    p99_ttft_ms: float | None
    token_check: str
    latencies_s: list[float]

    def flat(self) -> dict[str, float | int | None]:
        return {k: v for k, v in self.__dict__.items() if isinstance(v, (int, float)) or v is None}


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else None


def build_report(cfg: ReliabilityConfig, tally: Tally, wall_s: float) -> ReliabilityReport:
    """Fold the tally into the report; unaccounted requests or attempts show up as `lost`, never disappear."""
    completed = tally.outcomes.get(OK, 0)
    accounted = sum(tally.outcomes.values())
    lost = (tally.requests_started - accounted) + (tally.attempts_started - sum(tally.attempts.values()))
    failed = accounted - completed
    return ReliabilityReport(
        users=cfg.users, duration_s=cfg.duration_s, wall_s=wall_s,
        requests_sent=tally.requests_started, completed=completed, failed=failed, lost=lost,
        success_rate=completed / tally.requests_started if tally.requests_started else 0.0,
        errors={k: v for k, v in tally.outcomes.most_common() if k != OK},
        http_attempts=tally.attempts_started, attempt_outcomes=dict(tally.attempts.most_common()),
        rejected_retried=tally.attempts.get(REJECTED_RETRIED, 0),
        requests_per_s=completed / wall_s if wall_s > 0 else 0.0,
        p50_latency_ms=_pct(tally.latencies, 50), p99_latency_ms=_pct(tally.latencies, 99),
        p50_ttft_ms=_pct(tally.ttfts, 50), p99_ttft_ms=_pct(tally.ttfts, 99),
        token_check="exact (logprobs)" if cfg.logprobs else "upper bound (no logprobs)",
        latencies_s=sorted(tally.latencies),
    )


def _raise_fd_limit(needed: int) -> None:
    """Each user holds a socket; lift the soft open-files limit toward the hard one so 1000 users fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def _user(uid: int, cfg: ReliabilityConfig, session: aiohttp.ClientSession, deadline: float,
                tally: Tally) -> None:
    """One simulated user: short random chat requests back to back until the deadline, each retried on 429/503."""
    rng = random.Random(cfg.seed * 1_000_003 + uid)
    url = join_url(cfg.base_url, CHAT)
    await asyncio.sleep(rng.uniform(0.0, min(1.0, cfg.duration_s / 4)))
    while time.monotonic() < deadline:
        prompt = " ".join(rng.choice(WORDS) for _ in range(cfg.prompt_words))
        payload: dict[str, Any] = {"model": cfg.model, "messages": [{"role": "user", "content": prompt}],
                         "max_tokens": cfg.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
        if cfg.logprobs:
            payload["logprobs"] = True
        if cfg.ignore_eos:
            payload["ignore_eos"] = True
        await _logical_request(cfg, session, url, payload, tally)
        if cfg.think_time > 0:
            await asyncio.sleep(rng.uniform(0.0, 2 * cfg.think_time))


async def _logical_request(cfg: ReliabilityConfig, session: aiohttp.ClientSession, url: str,
                           payload: dict[str, Any], tally: Tally) -> None:
    """Send until accepted or out of retries; record exactly one request outcome and one outcome per attempt."""
    tally.requests_started += 1
    t0 = time.perf_counter()
    in_attempt = False
    try:
        for attempt in range(cfg.max_retries + 1):
            tally.attempts_started += 1
            in_attempt = True
            result = await stream_once(session, url, payload, cfg.request_timeout)
            kind = check_response(result, cfg)
            in_attempt = False
            if kind == REJECTED and attempt < cfg.max_retries:
                tally.attempts[REJECTED_RETRIED] += 1
                await asyncio.sleep(retry_delay(result.retry_after, attempt, cfg.retry_after_cap))
                continue
            kind = REJECTED_GAVE_UP if kind == REJECTED else kind
            tally.attempts[kind] += 1
            tally.outcomes[kind] += 1
            if kind == OK:
                tally.latencies.append(time.perf_counter() - t0)
                tally.ttfts.append(result.acc.first_token_time - t0)
            return
    except asyncio.CancelledError:
        if in_attempt:
            tally.attempts[CANCELLED] += 1
        tally.outcomes[CANCELLED] += 1
        raise


async def _run(cfg: ReliabilityConfig, show_progress: bool) -> ReliabilityReport:
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=cfg.users, limit_per_host=cfg.users)
    start = time.monotonic()
    deadline = start + cfg.duration_s
    async with aiohttp.ClientSession(connector=connector) as session:
        users = [asyncio.create_task(_user(i, cfg, session, deadline, tally)) for i in range(cfg.users)]
        with tqdm(total=round(cfg.duration_s), desc=f"reliability {cfg.users} users", unit="s", file=sys.stderr,
                  disable=not show_progress) as bar:
            pending = set(users)
            while pending and time.monotonic() < start + cfg.hard_stop_s:
                _, pending = await asyncio.wait(pending, timeout=0.5)
                bar.n = min(round(time.monotonic() - start), bar.total)
                bar.set_postfix(ok=tally.outcomes.get(OK, 0), failed=sum(tally.outcomes.values())
                                - tally.outcomes.get(OK, 0), refresh=True)
        for task in pending:
            task.cancel()
        await asyncio.gather(*users, return_exceptions=True)
    return build_report(cfg, tally, time.monotonic() - start)


def run_reliability(cfg: ReliabilityConfig, show_progress: bool = True) -> ReliabilityReport:
    """Run the users until `duration_s`, let in-flight requests finish (bounded by timeouts), then report."""
    _raise_fd_limit(2 * cfg.users + 256)
    return asyncio.run(_run(cfg, show_progress))
