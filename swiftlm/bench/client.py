"""A minimal streaming client for OpenAI-compatible endpoints, shared by `bench serve` and `bench reliability`.

Written against the wire format rather than any engine so swiftlm, vLLM, SGLang and TGI are measured identically.
"""
from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from swiftlm.bench.datasets import SampleRequest
from swiftlm.bench.metrics import RequestRecord
from swiftlm.bench.sse import SSEDecoder, StreamAccumulator

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def join_url(base_url: str, path: str) -> str:
    """`base_url` may or may not already end in /v1; never produce /v1/v1."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        base = base[: -len("/v1")]
    return base + path


def auth_headers() -> dict[str, str]:
    """Bearer token from OPENAI_API_KEY, the variable every OpenAI-compatible server documents."""
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass
class EndpointConfig:
    """Where and how requests are sent. `temperature=None` leaves sampling to the server's defaults (as vLLM does)."""

    base_url: str
    model: str
    endpoint: str = COMPLETIONS
    temperature: float | None = None
    ignore_eos: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)
    request_timeout: float = 3600.0

    @property
    def url(self) -> str:
        return join_url(self.base_url, self.endpoint)

    @property
    def chat(self) -> bool:
        return self.endpoint == CHAT


def build_payload(cfg: EndpointConfig, req: SampleRequest) -> dict[str, Any]:
    """Streaming request body with usage reporting; --ignore-eos also pins min_tokens so lengths are exact."""
    payload: dict[str, Any] = {"model": cfg.model, "max_tokens": req.max_tokens, "stream": True,
                               "stream_options": {"include_usage": True}}
    if cfg.chat:
        prompt = req.prompt
        payload["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    else:
        payload["prompt"] = req.prompt
    if cfg.temperature is not None:
        payload["temperature"] = cfg.temperature
    if cfg.ignore_eos:
        payload["ignore_eos"] = True
        payload["min_tokens"] = req.max_tokens
    payload.update(cfg.extra_body)
    return payload


@dataclass
class StreamResult:
    """Outcome of one HTTP attempt: `status` is None when no response arrived; `error` names a transport failure."""

    acc: StreamAccumulator
    status: int | None = None
    retry_after: str | None = None
    error: str | None = None
    error_detail: str = ""


async def stream_once(session: aiohttp.ClientSession, url: str, payload: dict[str, Any],
                      timeout: float) -> StreamResult:
    """POST one streaming request and feed every SSE event, stamped on arrival, into a StreamAccumulator.

    Every exception except cancellation becomes an error kind, so a caller always gets exactly one result.
    """
    result = StreamResult(acc=StreamAccumulator(start=time.perf_counter()))
    try:
        async with session.post(url, json=payload, headers=auth_headers(),
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.retry_after = resp.headers.get("Retry-After")
                result.error = f"HTTP {resp.status}"
                result.error_detail = (await resp.text(errors="replace"))[:500]
                return result
            decoder = SSEDecoder()
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                for event in decoder.feed(chunk):
                    result.acc.add(event, now)
            for event in decoder.flush():
                result.acc.add(event, time.perf_counter())
    except TimeoutError:
        result.error, result.error_detail = "timeout", f"no complete response within {timeout:g}s"
    except aiohttp.ClientPayloadError as e:
        result.error, result.error_detail = "truncated stream", str(e)
    except aiohttp.ClientError as e:
        result.error, result.error_detail = f"connection error ({type(e).__name__})", str(e)
    except Exception as e:  # noqa: BLE001 - a client-side bug must still land in a bucket, never vanish from counts
        result.error, result.error_detail = f"client exception ({type(e).__name__})", str(e)
    return result


async def send_request(session: aiohttp.ClientSession, cfg: EndpointConfig, req: SampleRequest) -> RequestRecord:
    """One benchmark request, reduced to the record the metrics need."""
    result = await stream_once(session, cfg.url, build_payload(cfg, req), cfg.request_timeout)
    if result.error is None:
        return result.acc.to_record(req.prompt_len or 0)
    return RequestRecord(success=False, start_time=result.acc.start, prompt_tokens=req.prompt_len or 0,
                         error=result.error, error_detail=result.error_detail)


async def first_model(base_url: str, timeout: float = 30.0) -> str:
    """The first id /v1/models lists, for when --model is not given."""
    async with aiohttp.ClientSession() as session, session.get(
            join_url(base_url, "/v1/models"), headers=auth_headers(), timeout=aiohttp.ClientTimeout(total=timeout)
    ) as resp:
        resp.raise_for_status()
        data = await resp.json()
    models = data.get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/v1/models lists no model; pass --model")
    return str(models[0]["id"])


def resolve_model(base_url: str, model: str | None) -> str:
    return model if model else asyncio.run(first_model(base_url))
