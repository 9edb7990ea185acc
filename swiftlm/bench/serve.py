"""`bench serve`: online serving benchmark against any OpenAI-compatible server, optionally swept over concurrency."""
from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass

import aiohttp
import numpy as np
from tqdm import tqdm

from swiftlm.bench.client import EndpointConfig, send_request
from swiftlm.bench.datasets import SampleRequest
from swiftlm.bench.metrics import RequestRecord, ServeMetrics, compute_serve_metrics, poisson_arrival_offsets


@dataclass
class LevelResult:
    """One run of the workload at one concurrency cap (None = unlimited)."""

    max_concurrency: int | None
    request_rate: float
    metrics: ServeMetrics
    records: list[RequestRecord]

    @property
    def key(self) -> str:
        return f"concurrency={self.max_concurrency if self.max_concurrency is not None else 'inf'}"


def parse_concurrency_list(text: str | None) -> list[int | None]:
    """'1,2,4' -> [1, 2, 4]; absent -> [None] (no cap)."""
    if text is None:
        return [None]
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or any(c < 1 for c in levels):
        raise ValueError(f"--max-concurrency needs positive integers, got {text!r}")
    return levels


async def _run_level(cfg: EndpointConfig, requests: list[SampleRequest], concurrency: int | None,
                     request_rate: float, seed: int, num_warmups: int, show_progress: bool) -> LevelResult:
    """Warm up, then release requests on their Poisson schedule; the semaphore caps how many are in flight.

    Duration runs from the first scheduled send to the last response, like vLLM's benchmark_duration; a request's
    own clock starts only once it holds a concurrency slot, so queueing in the client is not charged to the server.
    """
    connector = aiohttp.TCPConnector(limit=concurrency or 0, limit_per_host=concurrency or 0)
    async with aiohttp.ClientSession(connector=connector) as session:
        slots = asyncio.Semaphore(concurrency) if concurrency else None

        async def one(req: SampleRequest) -> RequestRecord:
            if slots is None:
                return await send_request(session, cfg, req)
            async with slots:
                return await send_request(session, cfg, req)

        if num_warmups > 0:
            warm = await asyncio.gather(*(one(requests[i % len(requests)]) for i in range(num_warmups)))
            bad = [r for r in warm if not r.success]
            if bad:
                print(f"warning: {len(bad)}/{num_warmups} warmup requests failed: {bad[0].error} "
                      f"{bad[0].error_detail[:200]}", file=sys.stderr)

        offsets = poisson_arrival_offsets(len(requests), request_rate, np.random.default_rng(seed))
        bar = tqdm(total=len(requests), desc=f"serve c={concurrency or 'inf'}", file=sys.stderr,
                   disable=not show_progress)

        async def tracked(req: SampleRequest) -> RequestRecord:
            record = await one(req)
            bar.update(1)
            return record

        start = time.perf_counter()
        tasks = []
        for req, offset in zip(requests, offsets, strict=True):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(tracked(req)))
        records = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        bar.close()
    return LevelResult(concurrency, request_rate, compute_serve_metrics(records, duration), records)


def run_serve(cfg: EndpointConfig, requests: list[SampleRequest], levels: list[int | None],
              request_rate: float = math.inf, seed: int = 0, num_warmups: int = 0,
              show_progress: bool = True) -> list[LevelResult]:
    """Run the same workload once per concurrency level, in order, each on a fresh connection pool."""
    if not requests:
        raise ValueError("no requests to send")
    return [asyncio.run(_run_level(cfg, requests, c, request_rate, seed, num_warmups, show_progress))
            for c in levels]
