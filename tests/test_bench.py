"""Tests of the benchmark suite: the metric math by hand, and the clients against a scripted fake OpenAI server.

The fake streams with known timing (TTFT 50 ms, then one token every 10 ms, scheduled on absolute times so sleeps
do not drift), so every measured figure has a hand-computed expected value.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from aiohttp import web

import swiftlm
from swiftlm.bench import cli
from swiftlm.bench.client import EndpointConfig, StreamResult
from swiftlm.bench.datasets import (
    SampleRequest,
    jsonl_requests,
    random_requests,
    sample_lengths,
    shared_prefix_requests,
)
from swiftlm.bench.metrics import (
    LatencyStats,
    RequestRecord,
    causal_keys_attended,
    compute_serve_metrics,
    decode_time_per_token,
    peak_concurrency,
    poisson_arrival_offsets,
    prefill_flops,
    roofline,
    split_gap,
    time_per_output_token,
)
from swiftlm.bench.offline import (
    DevicePeaks,
    LatencyConfig,
    model_cost,
    run_latency,
    run_throughput,
)
from swiftlm.bench.reliability import (
    OK,
    REJECTED,
    ReliabilityConfig,
    check_response,
    retry_delay,
    run_reliability,
)
from swiftlm.bench.results import compare_markdown
from swiftlm.bench.serve import run_serve
from swiftlm.bench.sse import SSEDecoder, StreamAccumulator

TTFT = 0.050
ITL = 0.010


# ---- fake OpenAI-compatible server --------------------------------------------------------------------------------

@dataclass
class FakeServer:
    """Streams `max_tokens` tokens: first after TTFT, then one per ITL. Prompts containing FAIL500 get a 500,
    TRUNCATE drops the stream after 3 tokens, MULTI ships two tokens per chunk. Every `reject_every`-th request
    is answered 503 with Retry-After, every `truncate_every`-th is truncated."""

    reject_every: int = 0
    truncate_every: int = 0
    retry_after: str = "0.2"
    payloads: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        body = await request.json()
        self.payloads.append(body)
        self.count += 1
        chat = request.path.endswith("chat/completions")
        prompt = json.dumps(body.get("messages") if chat else body.get("prompt"))
        if "FAIL500" in prompt:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if self.reject_every and self.count % self.reject_every == 0:
            return web.json_response({"error": {"message": "busy"}}, status=503,
                                     headers={"Retry-After": self.retry_after})
        truncate = "TRUNCATE" in prompt or (self.truncate_every and self.count % self.truncate_every == 0)
        per_chunk = 2 if "MULTI" in prompt else 1
        n = int(body["max_tokens"])
        prompt_tokens = len(body["prompt"]) if isinstance(body.get("prompt"), list) else len(prompt.split())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            sent = 0
            for chunk_idx in range(0, n, per_chunk):
                k = min(per_chunk, n - sent)
                await asyncio.sleep(max(0.0, t0 + TTFT + (chunk_idx // per_chunk) * ITL * per_chunk
                                        - time.perf_counter()))
                if truncate and sent >= 3:
                    return resp  # ends the chunked body cleanly but without finish_reason or [DONE]
                sent += k
                toks = [f"t{sent - k + j} " for j in range(k)]
                finish = "length" if sent == n else None
                if chat:
                    choice: dict[str, Any] = {"index": 0, "delta": {"content": "".join(toks)}, "finish_reason": finish}
                    if body.get("logprobs"):
                        choice["logprobs"] = {"content": [{"token": t, "logprob": -0.5} for t in toks]}
                else:
                    choice = {"index": 0, "text": "".join(toks), "finish_reason": finish}
                    if per_chunk > 1:
                        choice["logprobs"] = {"tokens": toks}
                await resp.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
                await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.in_flight -= 1


@pytest.fixture
def fake_server():
    """Run a FakeServer on 127.0.0.1 (free port) in its own thread and event loop; yield it with `url` set."""
    server = FakeServer()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def start() -> None:
        runner = web.AppRunner(server.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state["runner"] = runner
        server.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield server
    asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


# ---- pure metric math ---------------------------------------------------------------------------------------------

def test_split_gap_tpot_and_decode():
    assert split_gap(0.03, 3) == pytest.approx([0.01, 0.01, 0.01])
    assert split_gap(0.03, 0) == []
    assert time_per_output_token(latency=0.12, ttft=0.05, output_tokens=8) == pytest.approx(0.01)
    assert time_per_output_token(latency=0.05, ttft=0.05, output_tokens=1) is None
    assert decode_time_per_token(full_s=1.2, prefill_s=0.2, output_len=101) == pytest.approx(0.01)
    with pytest.raises(ValueError):
        decode_time_per_token(1.0, 0.5, 1)


def test_serve_metrics_hand_computed():
    a = RequestRecord(success=True, start_time=0.0, ttft=0.1, itl=[0.02, 0.02, 0.04], latency=0.18,
                      prompt_tokens=10, output_tokens=4)
    b = RequestRecord(success=True, start_time=0.05, ttft=0.3, itl=[0.1], latency=0.4, prompt_tokens=20,
                      output_tokens=2)
    c = RequestRecord(success=True, start_time=1.5, ttft=0.2, itl=[], latency=0.2, prompt_tokens=5, output_tokens=1)
    bad = [RequestRecord(success=False, error="HTTP 500"), RequestRecord(success=False, error="HTTP 500"),
           RequestRecord(success=False, error="timeout")]
    m = compute_serve_metrics([a, b, c, *bad], duration_s=2.0)
    assert (m.completed, m.failed) == (3, 3)
    assert m.failure_reasons == {"HTTP 500": 2, "timeout": 1}
    assert (m.total_input_tokens, m.total_output_tokens) == (35, 7)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(21.0)
    # TTFT samples 100, 300, 200 ms: linear-interpolated p90 = 200 + 0.8*100, p99 = 200 + 0.98*100.
    assert (m.ttft.mean, m.ttft.median, m.ttft.p90, m.ttft.p99) == pytest.approx((200.0, 200.0, 280.0, 298.0))
    # TPOT only for >1 output tokens: a (180-100)/3 ms, b (400-300)/1 ms.
    assert m.tpot.count == 2 and m.tpot.mean == pytest.approx((80 / 3 + 100) / 2)
    # ITL pools every request's gaps: 20, 20, 40, 100 ms.
    assert m.itl.count == 4 and m.itl.mean == pytest.approx(45.0) and m.itl.median == pytest.approx(30.0)
    assert m.e2el.mean == pytest.approx((180 + 400 + 200) / 3)
    assert m.max_concurrent_requests == 2  # a and b overlap; c starts after both end
    assert m.max_output_tokens_per_s == 6.0  # all of a's and b's 6 tokens land in second 0, c's in second 1
    flat = m.flat()
    assert flat["p99_ttft_ms"] == pytest.approx(298.0) and "failure_reasons" not in flat


def test_empty_stats_and_peak_concurrency():
    assert LatencyStats.of_seconds([]).mean is None
    assert peak_concurrency([(0, 1), (1, 2), (2, 3)]) == 1  # half-open intervals touching do not overlap
    assert peak_concurrency([(0, 3), (1, 2), (1.5, 4)]) == 3
    m = compute_serve_metrics([RequestRecord(success=False, error="x")], 1.0)
    assert m.completed == 0 and m.ttft.mean is None and m.output_throughput == 0.0


def test_poisson_arrivals():
    rng = np.random.default_rng(0)
    offsets = poisson_arrival_offsets(1000, 50.0, rng)
    assert offsets[-1] == pytest.approx(1000 / 50.0)
    assert all(b >= a for a, b in itertools.pairwise(offsets))
    gaps = np.diff(offsets)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, abs=0.1)  # exponential gaps: CV = 1
    assert poisson_arrival_offsets(3, float("inf"), rng) == [0.0, 0.0, 0.0]


def test_prefill_flops_and_roofline():
    assert causal_keys_attended(4) == 10
    # 2 layers, 4 heads of dim 8, 100 dense params, 50 LM-head params, 4 tokens x 3 sequences.
    flops = prefill_flops(100, 50, num_layers=2, num_heads=4, head_dim=8, input_len=4, batch_size=3)
    assert flops == 2 * 100 * 12 + 2 * 50 * 3 + 4 * 2 * 4 * 8 * 10 * 3
    r = roofline(flops=1e12, prefill_bytes=1e9, decode_bytes=2e9, matmul_flops_per_s=1e15,
                 bandwidth_bytes_per_s=2e12, measured_prefill_s=0.002, measured_decode_s=0.004)
    assert r.prefill_floor_s == pytest.approx(1e-3)  # compute-bound: 1e12/1e15 > 1e9/2e12
    assert r.decode_floor_s == pytest.approx(1e-3)
    assert (r.prefill_ratio, r.decode_ratio) == pytest.approx((2.0, 4.0))


# ---- SSE parsing ---------------------------------------------------------------------------------------------------

def test_sse_decoder_handles_splits_comments_and_crlf():
    d = SSEDecoder()
    assert d.feed(b'data: {"a"') == []
    assert d.feed(b': 1}\n\n: ping\n\ndata: x\r\ndata: y\r\n\r\n') == ['{"a": 1}', "x\ny"]
    euro = "data: \u20ac\n\n".encode()
    assert d.feed(euro[:7]) == [] and d.feed(euro[7:]) == ["\u20ac"]  # UTF-8 char cut across reads
    assert d.feed(b"data: [DONE]") == [] and d.flush() == ["[DONE]"]


def _event(text: str = "", finish: str | None = None, logprob_tokens: int | None = None,
           usage: dict | None = None) -> str:
    choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish}
    if logprob_tokens is not None:
        choice["logprobs"] = {"tokens": ["x"] * logprob_tokens}
    data: dict[str, Any] = {"choices": [choice]}
    if usage is not None:
        data["usage"] = usage
    return json.dumps(data)


def test_accumulator_splits_multi_token_chunks():
    acc = StreamAccumulator(start=0.0)
    acc.add(_event("a"), 0.05)                      # first token: TTFT 50 ms
    acc.add(_event(""), 0.055)                      # empty text, no token: ignored for timing
    acc.add(_event("bc", logprob_tokens=2), 0.07)   # 2 tokens in 20 ms -> two 10 ms ITLs
    acc.add(_event("def", usage={"completion_tokens": 6}), 0.10)  # continuous usage: 3 new tokens in 30 ms
    acc.add(_event("g", finish="length"), 0.11)
    acc.add(json.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 7}}), 0.111)
    acc.add("[DONE]", 0.112)
    rec = acc.to_record(prompt_tokens=0)
    assert rec.success and rec.finish_reason == "length"
    assert rec.ttft == pytest.approx(0.05)
    assert rec.itl == pytest.approx([0.01] * 6)
    assert rec.latency == pytest.approx(0.11)       # E2E ends at the last token chunk, not at [DONE]
    assert (rec.output_tokens, rec.prompt_tokens) == (7, 9)
    assert acc.tokens_counted == 7 and not acc.exact_counts  # "a" and "g" were counted from text


def test_accumulator_failures():
    acc = StreamAccumulator(start=0.0)
    acc.add(_event("a"), 0.05)
    rec = acc.to_record(4)
    assert not rec.success and rec.error == "truncated stream" and rec.output_tokens == 1
    acc = StreamAccumulator(start=0.0)
    acc.add("[DONE]", 0.1)
    assert acc.to_record(4).error == "no tokens received"
    acc = StreamAccumulator(start=0.0)
    acc.add('{"error": {"message": "overloaded"}}', 0.1)
    assert acc.to_record(4).error == "error event in stream"
    acc = StreamAccumulator(start=0.0)
    acc.add("{not json", 0.1)
    assert acc.to_record(4).error == "invalid JSON in stream"


# ---- datasets ------------------------------------------------------------------------------------------------------

def test_random_and_shared_prefix_prompts_have_exact_lengths(tmp_path):
    reqs = random_requests(20, input_len=64, output_len=16, seed=3)
    assert all(len(r.prompt) == r.prompt_len == 64 and r.max_tokens == 16 for r in reqs)
    assert all(1000 <= t < 30000 for r in reqs for t in r.prompt)
    assert [r.prompt for r in reqs] == [r.prompt for r in random_requests(20, 64, 16, seed=3)]
    varied = random_requests(200, input_len=100, output_len=10, range_ratio=0.5, seed=1)
    lens = [r.prompt_len for r in varied]
    assert min(lens) >= 50 and max(lens) <= 150 and len(set(lens)) > 20
    assert all(n >= 1 for n in sample_lengths(1, 0.5, 50, np.random.default_rng(0)))

    shared = shared_prefix_requests(6, prefix_len=32, num_prefixes=2, input_len=8, output_len=4, seed=0)
    assert all(r.prompt_len == 40 for r in shared)
    assert shared[0].prompt[:32] == shared[2].prompt[:32] != shared[1].prompt[:32]
    assert shared[0].prompt[32:] != shared[2].prompt[32:]
    chat = shared_prefix_requests(4, prefix_len=16, num_prefixes=2, input_len=4, output_len=4, chat=True)
    first, third = chat[0].prompt[0]["content"].split(), chat[2].prompt[0]["content"].split()
    assert first[:16] == third[:16] and chat[0].prompt_len is None  # shared prefix survives the text fallback

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hello there", "max_tokens": 5}\n\n{"messages": [{"role": "user", "content": "x"}]}\n')
    reqs = jsonl_requests(path, 5, default_max_tokens=7, chat=True)
    assert [r.max_tokens for r in reqs] == [5, 7, 5, 7, 5]
    assert reqs[0].prompt == [{"role": "user", "content": "hello there"}]
    with pytest.raises(ValueError, match="chat"):
        jsonl_requests(path, 2, 7, chat=False)


# ---- bench serve against the fake server ---------------------------------------------------------------------------

def test_serve_metrics_match_scripted_timing(fake_server):
    cfg = EndpointConfig(base_url=fake_server.url + "/v1", model="fake-model", ignore_eos=True)
    reqs = random_requests(4, input_len=16, output_len=8, seed=0)
    [level] = run_serve(cfg, reqs, [1], show_progress=False)
    m = level.metrics
    assert (m.completed, m.failed, m.failure_reasons) == (4, 0, {})
    assert (m.total_input_tokens, m.total_output_tokens) == (64, 32)
    # The fake never answers early, so measured times sit at or just above the script; medians shrug off a
    # scheduling hiccup on a loaded machine.
    assert TTFT <= m.ttft.median / 1000 < TTFT + 0.012
    assert m.tpot.median / 1000 == pytest.approx(ITL, abs=0.0015)
    assert m.itl.count == 4 * 7 and m.itl.median / 1000 == pytest.approx(ITL, abs=0.0015)
    e2e = TTFT + 7 * ITL
    assert e2e <= m.e2el.median / 1000 < e2e + 0.012
    for r in level.records:
        assert r.latency == pytest.approx(r.ttft + sum(r.itl))
        assert time_per_output_token(r.latency, r.ttft, r.output_tokens) == pytest.approx(sum(r.itl) / 7)
    assert m.duration_s == pytest.approx(4 * e2e, rel=0.2)
    assert m.output_throughput == pytest.approx(32 / m.duration_s)
    assert m.total_token_throughput == pytest.approx((64 + 32) / m.duration_s)
    assert m.output_throughput == pytest.approx(8 / e2e, rel=0.2)
    assert m.request_throughput == pytest.approx(1 / e2e, rel=0.2)
    assert m.max_concurrent_requests == 1 and fake_server.peak_in_flight == 1
    body = fake_server.payloads[0]
    assert body["prompt"] == reqs[0].prompt and body["stream"] is True
    assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"] == 8
    assert body["stream_options"] == {"include_usage": True}


def test_serve_counts_failures_with_reasons(fake_server, tmp_path):
    path = tmp_path / "mixed.jsonl"
    lines = ["ok one", "FAIL500", "TRUNCATE", "MULTI", "ok two"]
    path.write_text("".join(json.dumps({"prompt": p, "max_tokens": 8}) + "\n" for p in lines))
    cfg = EndpointConfig(base_url=fake_server.url, model="fake-model")
    [level] = run_serve(cfg, jsonl_requests(path, 5, 8, chat=False), [1], show_progress=False)
    m = level.metrics
    assert (m.completed, m.failed) == (3, 2)
    assert m.failure_reasons == {"HTTP 500": 1, "truncated stream": 1}
    multi = level.records[3]
    assert multi.success and multi.output_tokens == 8
    # 4 chunks of 2 tokens every 20 ms: each later chunk's gap is split in two equal ITL samples of ~10 ms.
    assert len(multi.itl) == 6 and all(multi.itl[i] == multi.itl[i + 1] for i in (0, 2, 4))
    assert np.median(multi.itl) == pytest.approx(ITL, abs=0.0015)
    assert multi.latency - multi.ttft == pytest.approx(sum(multi.itl))
    assert level.records[0].prompt_tokens == 2  # unknown locally, taken from usage.prompt_tokens

    unreachable = EndpointConfig(base_url="http://127.0.0.1:9", model="m", request_timeout=5)
    [dead] = run_serve(unreachable, random_requests(2, 4, 2), [None], show_progress=False)
    assert dead.metrics.failure_reasons == {"connection error (ClientConnectorError)": 2}


def test_concurrency_sweep_writes_json_markdown_and_plots(fake_server, tmp_path, capsys):
    rc = cli.main(["serve", "--base-url", fake_server.url, "--num-prompts", "8", "--random-input-len", "12",
                   "--random-output-len", "5", "--max-concurrency", "1,2,4", "--ignore-eos", "--num-warmups", "2",
                   "--result-dir", str(tmp_path), "--label", "fake", "--disable-tqdm"])
    assert rc == 0
    [json_path] = tmp_path.glob("serve-fake-*.json")
    data = json.loads(json_path.read_text())
    assert data["kind"] == "serve" and data["label"] == "fake"
    assert data["args"]["max_concurrency"] == "1,2,4" and data["args"]["model"] is None
    assert data["model"] == "fake-model" and data["url"] == fake_server.url + "/v1/completions"
    env = data["environment"]
    assert env["hostname"] and env["torch"] == torch.__version__ and env["date_utc"].endswith("+00:00")
    assert env["swiftlm"] == swiftlm.__version__ and isinstance(env["argv"], list)  # the process's own argv
    assert [r["key"] for r in data["results"]] == ["concurrency=1", "concurrency=2", "concurrency=4"]
    for r, level in zip(data["results"], (1, 2, 4), strict=True):
        assert r["metrics"]["completed"] == 8 and r["metrics"]["total_output_tokens"] == 40
        assert r["metrics"]["max_concurrent_requests"] == level
        assert len(r["requests"]) == 8
    thr = [r["metrics"]["output_throughput"] for r in data["results"]]
    assert thr[1] > 1.2 * thr[0] and thr[2] > 1.2 * thr[1]  # ideally 2x per step: the fake has no contention
    assert all(p["model"] == "fake-model" for p in fake_server.payloads)  # resolved from /v1/models
    assert len(fake_server.payloads) == 3 * (8 + 2)
    md = json_path.with_suffix(".md").read_text()
    assert "| max conc |" in md and "\n| 4 |" in md
    pngs = sorted(p.name.removeprefix(json_path.stem) for p in tmp_path.glob("*.png"))
    assert pngs == ["-cdf.png", "-throughput.png", "-ttft-tpot.png"]
    assert all(p.stat().st_size > 5000 for p in tmp_path.glob("*.png"))
    assert "TTFT mean" in capsys.readouterr().out


# ---- bench reliability ---------------------------------------------------------------------------------------------

def _result(status: int = 200, events: list[str] = (), error: str | None = None) -> StreamResult:
    acc = StreamAccumulator(start=0.0)
    for i, e in enumerate(events):
        acc.add(e, 0.01 * (i + 1))
    return StreamResult(acc=acc, status=status, error=error)


def _chat(content: str, finish: str | None = None, n_logprobs: int | None = None) -> str:
    choice: dict[str, Any] = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
    if n_logprobs is not None:
        choice["logprobs"] = {"content": [{"token": "x", "logprob": 0.0}] * n_logprobs}
    return json.dumps({"choices": [choice]})


def _usage(n: int) -> str:
    return json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n}})


def test_check_response_buckets():
    cfg = ReliabilityConfig(base_url="http://127.0.0.1:1", model="m", max_tokens=2)
    good = [_chat("a", n_logprobs=1), _chat("b", "length", 1), _usage(2), "[DONE]"]
    assert check_response(_result(events=good), cfg) == OK
    assert check_response(_result(status=503, error="HTTP 503"), cfg) == REJECTED
    assert check_response(_result(status=429, error="HTTP 429"), cfg) == REJECTED
    assert check_response(_result(status=500, error="HTTP 500"), cfg) == "HTTP 500"
    assert check_response(_result(events=good[:2]), cfg) == "missing usage"
    assert check_response(_result(events=good[:1]), cfg) == "truncated stream"
    assert check_response(_result(events=[good[0], _usage(2), "[DONE]"]), cfg) == "missing finish_reason"
    assert check_response(_result(events=[good[0], _chat("", "length", 0), _usage(3), "[DONE]"]),
                          cfg) == "token count mismatch"
    assert check_response(_result(events=[_chat("a", "length", 1), _usage(1), "[DONE]"]), cfg) == "wrong output length"
    stop = ReliabilityConfig(base_url="x", model="m", ignore_eos=False)
    assert check_response(_result(events=[_chat("a", "stop", 1), _usage(2), "[DONE]"]), stop) == OK  # unsent EOS
    assert retry_delay("2", 0, cap=10) == 2.0 and retry_delay("30", 0, cap=10) == 10.0
    assert retry_delay(None, 3, cap=10) == pytest.approx(0.4)
    assert retry_delay("Wed, 21 Oct 2015 07:28:00 GMT", 0, cap=5) == 0.0
    assert retry_delay("soon", 1, cap=5) == pytest.approx(0.1)


def test_reliability_completes_every_request_despite_503(fake_server):
    fake_server.reject_every = 7
    cfg = ReliabilityConfig(base_url=fake_server.url, model="fake-model", users=50, duration_s=3.0, max_tokens=4,
                            request_timeout=10.0, max_retries=8)
    t0 = time.monotonic()
    report = run_reliability(cfg, show_progress=False)
    assert time.monotonic() - t0 < cfg.duration_s + 3.0
    assert report.lost == 0 and report.failed == 0 and report.errors == {}
    assert report.success_rate == 1.0 and report.completed == report.requests_sent > 500
    assert report.rejected_retried > 0
    assert report.http_attempts == sum(report.attempt_outcomes.values()) == report.completed + report.rejected_retried
    assert fake_server.count == report.http_attempts
    assert report.p50_latency_ms >= (TTFT + 3 * ITL) * 1000 and report.p50_ttft_ms >= TTFT * 1000
    assert report.p99_latency_ms >= 200.0  # some requests waited out the 0.2 s Retry-After
    assert all(p["logprobs"] is True and p["ignore_eos"] is True for p in fake_server.payloads)


def test_reliability_puts_every_failure_in_a_bucket(fake_server):
    fake_server.truncate_every = 3
    cfg = ReliabilityConfig(base_url=fake_server.url, model="fake-model", users=5, duration_s=1.0, max_tokens=5,
                            request_timeout=5.0)
    report = run_reliability(cfg, show_progress=False)
    assert report.lost == 0 and report.errors.get("truncated stream", 0) > 0
    assert report.completed + report.failed == report.requests_sent == fake_server.count
    assert report.success_rate < 1.0


def test_reliability_command_writes_results(fake_server, tmp_path):
    rc = cli.main(["reliability", "--base-url", fake_server.url, "--users", "4", "--duration", "0.5",
                   "--max-tokens", "3", "--result-dir", str(tmp_path), "--label", "rel", "--disable-tqdm"])
    assert rc == 0
    [path] = tmp_path.glob("reliability-rel-*.json")
    data = json.loads(path.read_text())
    m = data["results"][0]["metrics"]
    assert data["model"] == "fake-model" and m["success_rate"] == 1.0 and m["lost"] == 0
    assert m["requests_sent"] == m["completed"] == fake_server.count
    assert path.with_suffix(".md").exists() and path.with_name(path.stem + "-cdf.png").stat().st_size > 0
    fake_server.truncate_every = 2
    assert cli.main(["reliability", "--base-url", fake_server.url, "--users", "2", "--duration", "0.3",
                     "--disable-tqdm"]) == 1  # a failed request makes the command fail


@pytest.mark.parametrize("command", ["serve", "latency", "throughput", "reliability", "compare"])
def test_every_command_has_help_under_swiftlm_bench(command, capsys):
    parser = argparse.ArgumentParser(prog="swiftlm")
    cli.add_bench_subparsers(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["bench", command, "--help"])
    assert exit_info.value.code == 0
    assert f"swiftlm bench {command}" in capsys.readouterr().out
    args = parser.parse_args(["bench"])
    assert args.func(args) == 2  # bare `swiftlm bench` prints its help


# ---- compare -------------------------------------------------------------------------------------------------------

def _run_file(path: Path, label: str, throughput: float, ttft: float) -> Path:
    path.write_text(json.dumps({"kind": "serve", "label": label, "results": [
        {"key": "concurrency=1", "metrics": {"output_throughput": throughput, "mean_ttft_ms": ttft,
                                             "p99_itl_ms": None}}]}))
    return path


def test_compare_renders_ratios(tmp_path, capsys):
    a = _run_file(tmp_path / "a.json", "swiftlm", 100.0, 50.0)
    b = _run_file(tmp_path / "b.json", "vllm", 250.0, 40.0)
    out = tmp_path / "cmp.md"
    assert cli.main(["compare", str(a), str(b), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| metric | swiftlm | vllm |" in text
    assert "| output_throughput | 100.00 | 250.00 (x2.50) |" in text
    assert "| mean_ttft_ms | 50.00 | 40.00 (x0.80) |" in text
    assert out.read_text() in text
    same = compare_markdown([json.loads(a.read_text())] * 2, ["x", "y"])
    assert "(x1.00)" in same


# ---- offline latency / throughput with a fake LLM -----------------------------------------------------------------

class _TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(64, 8)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8, bias=False) for _ in range(2)])
        self.lm_head = torch.nn.Linear(8, 64, bias=False)


@dataclass
class _Out:
    token_ids: list[int]


class FakeLLM:
    """An engine on virtual time: a generate call takes 20 ms of prefill plus 2 ms per further token."""

    def __init__(self) -> None:
        self.engine = type("Engine", (), {})()
        self.engine.model_runner = type("Runner", (), {"model": _TinyModel()})()
        self.engine.hf_config = {"num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                 "hidden_size": 8, "vocab_size": 64}  # a dict, as swiftlm's engine keeps it
        self.calls: list[tuple[list[list[int]], Any]] = []
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def generate(self, prompts: Any, params: Any = None, use_tqdm: bool = True) -> list[_Out]:
        self.calls.append((prompts, params))
        plist = params if isinstance(params, list) else [params] * len(prompts)
        self.now += 0.020 + 0.002 * (max(p.max_tokens for p in plist) - 1)
        return [_Out(list(range(p.max_tokens))) for p in plist]


def test_latency_separates_prefill_from_decode():
    llm = FakeLLM()
    cfg = LatencyConfig(input_len=16, output_len=11, batch_size=2, num_iters=4, num_iters_warmup=1)
    res = run_latency(llm, cfg, show_progress=False, clock=llm.clock)
    assert len(llm.calls) == 2 * (4 + 1)
    prompts, params = llm.calls[0]
    assert len(prompts) == 2 and all(len(p) == 16 and all(0 <= t < 64 for t in p) for p in prompts)
    assert params.max_tokens == 1 and llm.calls[1][1].max_tokens == 11 and llm.calls[1][1].ignore_eos
    assert llm.calls[0][0] != llm.calls[2][0]  # fresh prompts each call: no prefix-cache shortcut
    assert res.prefill_s == pytest.approx([0.020] * 4) and res.full_s == pytest.approx([0.040] * 4)
    assert res.prefill.median == pytest.approx(20.0) and res.e2e.p99 == pytest.approx(40.0)
    assert res.decode_per_token.median == pytest.approx(2.0)  # (40 - 20) / (11 - 1)
    assert res.decode_tokens_per_s == pytest.approx(2 / 0.002)
    assert res.prefill_tokens_per_s == pytest.approx(2 * 16 / 0.020)
    assert res.roofline is None and any("no CUDA" in n for n in res.notes)
    cost = model_cost(llm)
    assert (cost.dense_params, cost.lm_head_params) == (2 * 64, 512)
    assert cost.weight_bytes == (512 + 128 + 512) * 4 and cost.untied_embedding_bytes == 512 * 4
    assert cost.head_dim == 4 and cost.num_kv_heads == 1
    assert res.prefill_flops == prefill_flops(128, 512, 2, 2, 4, 16, 2)

    peaks = DevicePeaks(bandwidth_bytes_per_s=1e9, matmul_flops_per_s=1e12, device_name="fake")
    res = run_latency(llm, LatencyConfig(input_len=16, output_len=3, num_iters=1, num_iters_warmup=0),
                      show_progress=False, peaks=peaks, clock=llm.clock)
    kv = 1 * (16 + 1.5) * 2 * 2 * 1 * 4 * 4
    assert res.decode_bytes_per_step == pytest.approx((512 + 128) * 4 + kv)
    assert res.roofline.decode_floor_s == pytest.approx(res.decode_bytes_per_step / 1e9)
    assert res.flat()["decode_vs_floor"] == pytest.approx(0.002 / res.roofline.decode_floor_s)
    # prefill floor: compute 2*128*16 + 2*512 + 4*2*2*4*136 FLOPs at 1e12/s vs one read of 640*4 bytes at 1e9/s
    flops = prefill_flops(128, 512, 2, 2, 4, 16, 1)
    assert res.roofline.prefill_floor_s == pytest.approx(max(flops / 1e12, 640 * 4 / 1e9))
    assert res.flat()["prefill_vs_floor"] == pytest.approx(0.020 / res.roofline.prefill_floor_s)


def test_throughput_counts_all_tokens():
    llm = FakeLLM()
    reqs = [SampleRequest(prompt=[1] * 10, prompt_len=10, max_tokens=6) for _ in range(4)]
    res = run_throughput(llm, reqs, show_progress=False, clock=llm.clock)
    assert (res.num_requests, res.total_prompt_tokens, res.total_output_tokens) == (4, 40, 24)
    assert res.elapsed_s == pytest.approx(0.030)  # one batched call: 20 ms + 5 * 2 ms
    assert res.requests_per_s == pytest.approx(4 / 0.030)
    assert res.output_tokens_per_s == pytest.approx(24 / 0.030)
    assert res.total_tokens_per_s == pytest.approx(64 / 0.030)
    assert all(p.ignore_eos and p.min_tokens == 6 for p in llm.calls[0][1])


def test_latency_and_throughput_commands_write_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_build_llm", lambda args: FakeLLM())
    assert cli.main(["latency", "--model", "tiny", "--input-len", "8", "--output-len", "4", "--num-iters", "2",
                     "--num-iters-warmup", "0", "--load-format", "dummy", "--result-dir", str(tmp_path),
                     "--disable-tqdm"]) == 0
    [lat] = tmp_path.glob("latency-tiny-*.json")
    data = json.loads(lat.read_text())
    assert data["args"]["load_format"] == "dummy" and len(data["results"][0]["prefill_s"]) == 2
    assert isinstance(data["results"][0]["metrics"]["median_decode_per_token_ms"], float)  # values: tested above
    assert any("no CUDA" in n for n in data["results"][0]["notes"])
    assert cli.main(["throughput", "--model", "tiny", "--num-prompts", "3", "--input-len", "8", "--output-len", "4",
                     "--result-dir", str(tmp_path), "--disable-tqdm"]) == 0
    [thr] = tmp_path.glob("throughput-tiny-*.json")
    assert json.loads(thr.read_text())["results"][0]["metrics"]["total_output_tokens"] == 12
    assert "output_tokens_per_s" in capsys.readouterr().out
