"""The OpenAI-compatible server end to end: real uvicorn on 127.0.0.1, the real engine on the demo model (CPU).

A fake engine (tests/fake_engine.py) is used only where the test needs control the real one cannot give:
holding requests in flight for a shutdown drain, and counting engine calls while idle.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fake_engine import FakeEngine
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from swiftlm.config import EngineConfig
from swiftlm.demo import demo_model_path
from swiftlm.engine.llm_engine import LLMEngine
from swiftlm.sampling_params import SamplingParams
from swiftlm.server import AsyncEngine, GracefulServer, build_app

MODEL = "demo"
MAX_MODEL_LEN = 256
LONG = MAX_MODEL_LEN - 6  # max_tokens of requests that must still be running when the test acts
API_KEY = "sekret"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something nice."}]


class LiveServer:
    """uvicorn serving an app on a free port from a background thread."""

    def __init__(self, app: Any, drain_timeout: float = 10.0) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5)
        self.engine: AsyncEngine = app.state.engine
        self.server = GracefulServer(config, self.engine, drain_timeout)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert self.thread.is_alive(), "server failed to start"
            assert time.monotonic() < deadline, "server start timed out"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self, api_key: str = "unused", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


# On the GPU machine the same tests run against a large checkpoint: SWIFTLM_TEST_MODEL names its directory
# (which must hold a tokenizer) and SWIFTLM_TEST_LOAD_FORMAT=dummy gives it random weights.
TEST_MODEL = os.environ.get("SWIFTLM_TEST_MODEL")
TEST_LOAD_FORMAT = os.environ.get("SWIFTLM_TEST_LOAD_FORMAT", "auto")


def _engine_factory(**overrides: Any) -> Callable[[], LLMEngine]:
    config = EngineConfig(model=TEST_MODEL, load_format=TEST_LOAD_FORMAT, max_model_len=MAX_MODEL_LEN,
                          num_kv_blocks=256, **overrides)
    return lambda: LLMEngine(config)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer(build_app(_engine_factory(), served_model_name=MODEL))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def guarded() -> Iterator[LiveServer]:
    """One running sequence, two waiting at most, and an API key: for overload and auth."""
    live = LiveServer(build_app(_engine_factory(max_num_seqs=1), served_model_name=MODEL, api_key=API_KEY,
                                max_waiting=2))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(TEST_MODEL or demo_model_path())


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics[(name, tuple(sorted({"model_name": MODEL, **labels}.items())))]


def _wait_idle(live: LiveServer, timeout: float = 20.0) -> None:
    """Until the engine runs nothing and every KV block is free again."""
    deadline = time.monotonic() + timeout
    while True:
        stats = live.engine.stats
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return
        assert time.monotonic() < deadline, f"engine did not go idle: {stats}"
        time.sleep(0.02)


def _good_chat(live: LiveServer) -> None:
    r = httpx.post(f"{live.url}/v1/chat/completions",
                   json={"model": MODEL, "messages": CHAT, "max_tokens": 1}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 1


# ---- basic routes ----

def test_models_health_version(server: LiveServer) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert isinstance(httpx.get(f"{server.url}/version").json()["version"], str)


def test_tokenize_detokenize(server: LiveServer, tokenizer: Any) -> None:
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello there, world"}).json()
    assert r["tokens"] == tokenizer.encode("Hello there, world")
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_MODEL_LEN
    back = httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": "Hello there, world"}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": CHAT}).json()
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tokenizer.encode(text, add_special_tokens=False)


# ---- generation ----

@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.95, "seed": 1234}],
                         ids=["greedy", "seeded"])
def test_chat_stream_matches_non_stream(server: LiveServer, tokenizer: Any, sampling: dict) -> None:
    client = server.client()
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=10, logprobs=True, top_logprobs=2, **sampling)
    full = client.chat.completions.create(**kwargs)
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompt_len = len(tokenizer.encode(text, add_special_tokens=False))
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-") and full.model == MODEL
    assert full.usage.prompt_tokens == prompt_len
    assert full.usage.total_tokens == prompt_len + full.usage.completion_tokens
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    assert len(full.choices[0].logprobs.content) == full.usage.completion_tokens

    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    *body, final, usage_chunk = chunks
    streamed = "".join(c.choices[0].delta.content or "" for c in body)
    streamed_tokens = sum(len(c.choices[0].logprobs.content) for c in body if c.choices[0].logprobs)
    assert streamed == full.choices[0].message.content
    assert final.choices[0].finish_reason == full.choices[0].finish_reason
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == streamed_tokens == full.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == prompt_len
    for entry in full.choices[0].logprobs.content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


@pytest.mark.parametrize("prompt", ["The weather today is", [11, 22, 33, 44], [[5, 6, 7]], ["Once upon a"]],
                         ids=["text", "token-ids", "token-ids-batch-of-1", "text-batch-of-1"])
def test_completion_stream_matches_non_stream(server: LiveServer, tokenizer: Any, prompt: Any) -> None:
    client = server.client()
    kwargs = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0.7, "seed": 99, "logprobs": 3,
              "extra_body": {"ignore_eos": True}}
    full = client.completions.create(**kwargs)
    inner = prompt[0] if isinstance(prompt[0], (list, str)) and not isinstance(prompt, str) else prompt
    prompt_len = len(tokenizer.encode(inner)) if isinstance(inner, str) else len(inner)
    assert full.object == "text_completion" and full.usage.prompt_tokens == prompt_len
    assert full.usage.completion_tokens == 8 and full.choices[0].finish_reason == "length"
    lp = full.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert lp.text_offset == sorted(lp.text_offset) and all(len(top) <= 3 for top in lp.top_logprobs)

    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    *body, final, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text
    assert sum(len(c.choices[0].logprobs.tokens) for c in body) == 8
    assert final.choices[0].finish_reason == "length"
    assert usage_chunk.usage.completion_tokens == 8 and usage_chunk.usage.prompt_tokens == prompt_len


def test_stop_string_and_stop_reason(server: LiveServer) -> None:
    client = server.client()
    kwargs = {"model": MODEL, "prompt": "The weather today is", "max_tokens": 16, "temperature": 1.0, "seed": 5}
    text = client.completions.create(**kwargs).choices[0].text
    # a 3-character piece of the text that first occurs after its start
    stop = next(text[i:i + 3] for i in range(1, len(text) - 3)
                if text[i:i + 3].strip() and text.index(text[i:i + 3]) > 0)
    cut = client.completions.create(stop=[stop], **kwargs)
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].stop_reason == stop
    assert cut.choices[0].text == text[:text.index(stop)]


def test_missing_max_tokens_fills_context(server: LiveServer) -> None:
    prompt = list(range(1, MAX_MODEL_LEN - 4))
    r = server.client().completions.create(model=MODEL, prompt=prompt, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"


def test_64_concurrent_streams(server: LiveServer) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i}"}], max_tokens=6, stream=True,
            temperature=0.8, seed=i, logprobs=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        tokens, usage, reason = 0, 0, ""
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                tokens += len(choice.logprobs.content) if choice.logprobs else 0
                reason = choice.finish_reason or reason
        return tokens, usage, reason

    async def main() -> list[tuple[int, int, str]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert results == [(6, 6, "length")] * 64
    _wait_idle(server)


# ---- errors ----

LONG_PROMPT = list(range(1, MAX_MODEL_LEN + 1))
BAD_REQUESTS: list[tuple[str, str, Any, int, str | None]] = [
    # (id, path, body (bytes = raw), status, param)
    ("malformed-json", "/v1/chat/completions", b'{"model": "demo", "messages": [', 400, None),
    ("json-array-body", "/v1/chat/completions", b"[1, 2]", 400, None),
    ("missing-messages", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("messages-not-list", "/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("empty-messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("bad-role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("content-number", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages"),
    ("image-part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages"),
    ("max-tokens-string", "/v1/chat/completions", {"messages": CHAT, "max_tokens": "5"}, 400, "max_tokens"),
    ("max-tokens-zero", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("max-completion-tokens-negative", "/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": -2},
     400, "max_completion_tokens"),
    ("temperature-negative", "/v1/chat/completions", {"messages": CHAT, "temperature": -1}, 400, "temperature"),
    ("top-p-too-big", "/v1/chat/completions", {"messages": CHAT, "top_p": 1.5}, 400, "top_p"),
    ("top-p-zero", "/v1/chat/completions", {"messages": CHAT, "top_p": 0}, 400, "top_p"),
    ("presence-penalty-range", "/v1/chat/completions", {"messages": CHAT, "presence_penalty": 5}, 400,
     "presence_penalty"),
    ("n-2", "/v1/chat/completions", {"messages": CHAT, "n": 2}, 400, "n"),
    ("stream-not-bool", "/v1/chat/completions", {"messages": CHAT, "stream": "yes"}, 400, "stream"),
    ("stream-options-without-stream", "/v1/chat/completions",
     {"messages": CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("top-logprobs-without-logprobs", "/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("top-logprobs-too-many", "/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
     400, "logprobs"),
    ("empty-stop", "/v1/chat/completions", {"messages": CHAT, "stop": [""]}, 400, "stop"),
    ("min-tokens-over-max", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2, "min_tokens": 5}, 400,
     "min_tokens"),
    ("tools", "/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("unknown-model", "/v1/chat/completions", {"model": "gpt-9", "messages": CHAT}, 404, "model"),
    ("prompt-too-long", "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 1}, 400, "prompt"),
    ("prompt-plus-max-tokens", "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": MAX_MODEL_LEN}, 400,
     "max_tokens"),
    ("missing-prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("empty-prompt", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("token-out-of-vocab", "/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("negative-token", "/v1/completions", {"prompt": [-1]}, 400, "prompt"),
    ("mixed-prompt-list", "/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
    ("batched-prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("echo", "/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("best-of", "/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("completion-logprobs-too-many", "/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("stop-token-out-of-vocab", "/v1/completions", {"prompt": "hi", "stop_token_ids": [2**70]}, 400,
     "stop_token_ids"),
    ("tokenize-nothing", "/tokenize", {}, 400, "prompt"),
    ("detokenize-out-of-vocab", "/detokenize", {"tokens": [10**6]}, 400, "tokens"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_4xx_and_server_recovers(server: LiveServer, case: tuple) -> None:
    _, path, body, status, param = case
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(f"{server.url}{path}", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"
    _good_chat(server)


def test_unknown_fields_are_ignored(server: LiveServer) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi", "extra": 1}],
                         "max_tokens": 2, "parallel_tool_calls": False, "metadata": {"k": "v"}, "store": False})
    assert r.status_code == 200, r.text


def test_unknown_route_and_method_have_error_body(server: LiveServer) -> None:
    r = httpx.get(f"{server.url}/v1/nope")
    assert r.status_code == 404 and "message" in r.json()["error"]
    r = httpx.get(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405 and "message" in r.json()["error"]


def test_openai_client_raises_bad_request(server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model=MODEL, messages=CHAT, temperature=7777)
    assert info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nope", prompt="x")


# ---- disconnects, engine failures ----

def test_stream_disconnect_aborts_and_frees_blocks(server: LiveServer) -> None:
    _wait_idle(server)
    before = _metrics(server.url)
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": LONG, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 2:
                break
        assert server.engine.stats.num_running == 1
    _wait_idle(server, timeout=5)
    after = _metrics(server.url)
    assert _sample(after, "vllm:request_success_total", finished_reason="abort") \
        == _sample(before, "vllm:request_success_total", finished_reason="abort") + 1
    assert _sample(after, "vllm:kv_cache_usage_perc") == 0.0
    generated = _sample(after, "vllm:generation_tokens_total") - _sample(before, "vllm:generation_tokens_total")
    assert 2 <= generated < LONG


def test_non_stream_disconnect_aborts(server: LiveServer) -> None:
    _wait_idle(server)
    before = _metrics(server.url)
    body = json.dumps({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": LONG, "ignore_eos": True}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n" \
           f"Content-Length: {len(body)}\r\n\r\n".encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body)
        deadline = time.monotonic() + 20
        while server.engine.stats.num_running != 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    _wait_idle(server)
    after = _metrics(server.url)
    assert _sample(after, "vllm:request_success_total", finished_reason="abort") \
        == _sample(before, "vllm:request_success_total", finished_reason="abort") + 1
    assert _sample(after, "vllm:request_success_total", finished_reason="length") \
        == _sample(before, "vllm:request_success_total", finished_reason="length")


def _fail_next_step(live: LiveServer) -> None:
    """Make the real engine's next step raise (the instance attribute shadows the method, then removes itself)."""
    engine = live.engine.engine

    def failing() -> list:
        del engine.step
        raise RuntimeError("injected failure")

    engine.step = failing


def test_engine_error_fails_request_with_500_and_server_continues(server: LiveServer) -> None:
    _wait_idle(server)
    _fail_next_step(server)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 4},
                   timeout=30)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    _wait_idle(server)
    _good_chat(server)


def test_engine_error_mid_stream_sends_error_event(server: LiveServer) -> None:
    _wait_idle(server)
    stream = server.client().completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=LONG, stream=True,
                                                extra_body={"ignore_eos": True})
    next(iter(stream))
    _fail_next_step(server)
    with pytest.raises(openai.APIError, match="internal engine error"):
        for _ in stream:
            pass
    _wait_idle(server)
    _good_chat(server)


# ---- metrics ----

def test_metrics_move(server: LiveServer) -> None:
    _wait_idle(server)
    before = _metrics(server.url)
    r = server.client().completions.create(model=MODEL, prompt=[7, 8, 9, 10], max_tokens=5,
                                           extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    after = _metrics(server.url)

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("vllm:request_success_total", finished_reason="length") == 1
    assert delta("vllm:prompt_tokens_total") == 4
    assert delta("vllm:generation_tokens_total") == 5
    assert delta("vllm:time_to_first_token_seconds_count") == 1
    assert delta("vllm:inter_token_latency_seconds_count") == 4
    assert delta("vllm:e2e_request_latency_seconds_count") == 1
    assert _sample(after, "vllm:num_requests_running") == 0
    assert _sample(after, "vllm:num_requests_waiting") == 0
    assert _sample(after, "vllm:kv_cache_usage_perc") == 0.0


# ---- overload and auth ----

def test_auth(guarded: LiveServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.get(f"{guarded.url}/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{guarded.url}/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 401
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    assert httpx.get(f"{guarded.url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        guarded.client().models.list()
    ok = guarded.client(API_KEY).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert ok.usage.completion_tokens >= 1


def test_overload_returns_503_with_retry_after_then_recovers(guarded: LiveServer) -> None:
    _wait_idle(guarded)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 32, "ignore_eos": True}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=guarded.url, headers=headers, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(12)))

    responses = asyncio.run(burst())
    ok = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 503]
    assert len(ok) + len(rejected) == 12
    # At most max_waiting=2 queue behind the one running sequence (the first may still count as waiting).
    assert len(ok) >= 2 and rejected, [r.status_code for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] == 32 for r in ok)
    for r in rejected:
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "overloaded"
    _wait_idle(guarded)
    again = guarded.client(API_KEY).completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert again.choices[0].finish_reason in ("stop", "length")


# ---- shutdown and the engine thread (fake engine: it can be made slow on purpose) ----

def _fake_server(drain_timeout: float) -> LiveServer:
    return LiveServer(build_app(lambda: FakeEngine(step_delay=0.02), served_model_name=MODEL),
                      drain_timeout=drain_timeout)


def _sse_lines(live: LiveServer, max_tokens: int) -> Iterator[dict]:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": max_tokens, "stream": True}
    with httpx.stream("POST", f"{live.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[len("data: "):])


def _wait_draining(live: LiveServer) -> None:
    deadline = time.monotonic() + 5
    while httpx.get(f"{live.url}/health").status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_sigterm_drains_in_flight_then_exits() -> None:
    live = _fake_server(drain_timeout=30)
    events = _sse_lines(live, max_tokens=40)
    assert next(events)["choices"][0]["text"]
    live.server.handle_exit(signal.SIGTERM, None)
    _wait_draining(live)
    r = httpx.post(f"{live.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    rest = list(events)
    assert rest[-1]["choices"][0]["finish_reason"] == "length"
    live.thread.join(15)
    assert not live.thread.is_alive()


def test_sigterm_aborts_requests_past_the_timeout() -> None:
    live = _fake_server(drain_timeout=0.3)
    events = _sse_lines(live, max_tokens=200)
    next(events)
    started = time.monotonic()
    live.server.handle_exit(signal.SIGTERM, None)
    rest = list(events)
    assert "shut down" in rest[-1]["error"]["message"]
    live.thread.join(15)
    assert not live.thread.is_alive() and time.monotonic() - started < 10


class _CountingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.polls = 0

    def has_unfinished_requests(self) -> bool:
        self.polls += 1
        return super().has_unfinished_requests()


def test_engine_thread_blocks_when_idle_and_rejects_duplicates() -> None:
    fake = _CountingEngine()

    async def main() -> None:
        engine = AsyncEngine(fake, max_waiting=4)
        await engine.start()
        outs = [o async for o in engine.generate("a", "hello", SamplingParams(max_tokens=3))]
        assert [len(o.token_ids) for o in outs] == [1, 2, 3] and outs[-1].finished
        polls = fake.polls
        await asyncio.sleep(0.3)
        assert fake.polls - polls <= 1
        gen = engine.generate("b", "hello", SamplingParams(max_tokens=50))
        await gen.__anext__()
        with pytest.raises(ValueError, match="duplicate"):
            await engine.generate("b", "x", SamplingParams()).__anext__()
        await gen.aclose()
        await engine.shutdown(timeout=1)
        assert not fake.has_unfinished_requests()

    asyncio.run(main())
