"""The OpenAI-compatible HTTP app (FastAPI) and its uvicorn runner.

Request handling stays on the event loop and never touches the engine directly: prompts are rendered and
tokenized on a one-thread pool (the server's own tokenizer copy), validated here so bad input is a 4xx before it
reaches the engine, then streamed through AsyncEngine.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import importlib.metadata
import inspect
import json
import logging
import os
import signal
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from transformers import PreTrainedTokenizerBase

from swiftlm.outputs import RequestOutput, TokenLogprob
from swiftlm.sampling_params import SamplingParams
from swiftlm.server.async_engine import (
    DEFAULT_MAX_WAITING,
    AsyncEngine,
    EngineInternalError,
    EngineOverloadedError,
    EngineShutdownError,
)
from swiftlm.server.metrics import ServerMetrics
from swiftlm.server.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TopLogprob,
    UsageInfo,
    error_body,
    new_id,
)

if TYPE_CHECKING:
    from swiftlm.config import EngineConfig
    from swiftlm.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

T = TypeVar("T")

OPEN_PATHS = frozenset({"/health", "/metrics"})
_RESERVED_TEMPLATE_KWARGS = frozenset(
    inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) - {"self", "kwargs"}


def _version() -> str:
    try:
        return importlib.metadata.version("swiftlm")
    except importlib.metadata.PackageNotFoundError:
        import swiftlm
        return getattr(swiftlm, "__version__", "0.0.0")


class _ServerState:
    """Everything the routes share; built at app creation, completed once the engine has started."""

    def __init__(self, engine: AsyncEngine, served_model_name: str | None) -> None:
        self.engine = engine
        self.requested_name = served_model_name
        self.served_model_name = served_model_name or ""
        self.metrics: ServerMetrics | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swiftlm-tokenizer")
        self._token_text: dict[int, str] = {}

    def on_started(self) -> None:
        self.served_model_name = self.requested_name or self.engine.model_name
        self.metrics = ServerMetrics(self.served_model_name)
        self.engine.metrics = self.metrics

    def tokenizer(self, param: str) -> Any:
        """The server's tokenizer; a weights-only checkpoint has none, and then only token ids work."""
        if self.engine.tokenizer is None:
            raise APIError("this model has no tokenizer: send token ids", param=param)
        return self.engine.tokenizer

    async def in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.served_model_name:
            raise APIError(f"The model `{model}` does not exist.", status=404, param="model",
                           code="model_not_found")

    def token_text(self, token_id: int) -> str:
        """Text of one token for logprobs; cached because the same ids recur across every top-k list."""
        text = self._token_text.get(token_id)
        if text is None:
            tok = self.engine.tokenizer
            text = tok.decode([token_id], skip_special_tokens=False) if tok is not None else f"token_id:{token_id}"
            self._token_text[token_id] = text
        return text


# ---- prompt preparation (runs on the tokenizer thread) ----

def _render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool,
                 template_kwargs: dict[str, Any] | None) -> list[int]:
    kwargs = dict(template_kwargs or {})
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS & kwargs.keys())
    if reserved:
        raise APIError(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                             **kwargs)
    except (TemplateError, ValueError, TypeError) as exc:
        raise APIError(f"cannot apply the chat template: {exc}", param="messages") from exc
    return tokenizer.encode(text, add_special_tokens=False)


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(f"token id {bad} is out of range for a vocabulary of {vocab_size}", param=param)


def _resolve_max_tokens(prompt_len: int, requested: int | None, max_model_len: int, prompt_param: str,
                        max_tokens_param: str) -> int:
    """Validate lengths against the context, and fill the rest of it when max_tokens is absent."""
    if prompt_len == 0:
        raise APIError("the prompt is empty", param=prompt_param)
    if prompt_len >= max_model_len:
        raise APIError(f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                       f"{prompt_len} tokens, leaving no room for the completion.", param=prompt_param,
                       code="context_length_exceeded")
    if requested is None:
        return max_model_len - prompt_len
    if requested < 1:
        raise APIError(f"{max_tokens_param} must be at least 1, got {requested}", param=max_tokens_param)
    if prompt_len + requested > max_model_len:
        raise APIError(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                       f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                       f"completion).", param=max_tokens_param, code="context_length_exceeded")
    return requested


# ---- engine interaction ----

def _engine_error(exc: BaseException) -> APIError:
    """Map what AsyncEngine raises to the HTTP error a client should see."""
    if isinstance(exc, EngineOverloadedError):
        return APIError(str(exc), status=503, type="server_error", code="overloaded",
                        headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, EngineShutdownError):
        return APIError(str(exc), status=503, type="server_error", code="shutting_down")
    if isinstance(exc, EngineInternalError):
        return APIError(str(exc), status=500, type="server_error", code="internal_error")
    if isinstance(exc, ValueError):
        return APIError(str(exc))
    raise exc


_ENGINE_ERRORS = (EngineOverloadedError, EngineShutdownError, EngineInternalError, ValueError)


async def _first_output(agen: AsyncGenerator[RequestOutput, None]) -> RequestOutput:
    """Wait for admission and the first output, so errors become a status code before any byte is streamed."""
    try:
        return await agen.__anext__()
    except _ENGINE_ERRORS as exc:
        raise _engine_error(exc) from exc


async def _last_output(agen: AsyncGenerator[RequestOutput, None], first: RequestOutput) -> RequestOutput:
    last = first
    try:
        async with contextlib.aclosing(agen):
            async for out in agen:
                last = out
    except _ENGINE_ERRORS as exc:
        raise _engine_error(exc) from exc
    return last


async def _cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run `work`, cancelling it if the client goes away first (its request is then aborted in the engine)."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)


def _sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


_SSE_DONE = "data: [DONE]\n\n"


# ---- logprobs ----

def _chat_logprobs(state: _ServerState, entries: list[TokenLogprob], top_k: int) -> ChatLogprobs:
    content = []
    for entry in entries:
        token = state.token_text(entry.token_id)
        ranked = sorted(entry.top.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
        top = [TopLogprob(token=(t := state.token_text(tid)), logprob=lp, bytes=list(t.encode()))
               for tid, lp in ranked]
        content.append(ChatTokenLogprob(token=token, logprob=entry.logprob, bytes=list(token.encode()),
                                        top_logprobs=top))
    return ChatLogprobs(content=content)


def _completion_logprobs(state: _ServerState, entries: list[TokenLogprob], top_k: int,
                         offset: int) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for entry in entries:
        token = state.token_text(entry.token_id)
        ranked = sorted(entry.top.items(), key=lambda kv: kv[1], reverse=True)[:top_k]
        result.tokens.append(token)
        result.token_logprobs.append(entry.logprob)
        result.top_logprobs.append({state.token_text(tid): lp for tid, lp in ranked})
        result.text_offset.append(offset)
        offset += len(token)
    return result


# ---- routes ----

async def _submit(state: _ServerState, body: ChatCompletionRequest | CompletionRequest, prompt_ids: list[int],
                  prompt_param: str, max_tokens_param: str,
                  id_prefix: str) -> tuple[str, SamplingParams, AsyncGenerator[RequestOutput, None], RequestOutput]:
    """Validate against the context, submit, and wait for the first output."""
    engine = state.engine
    max_tokens = _resolve_max_tokens(len(prompt_ids), body.requested_max_tokens(), engine.max_model_len,
                                     prompt_param, max_tokens_param)
    params = body.sampling_params(max_tokens)
    _check_token_ids(params.stop_token_ids, engine.vocab_size, "stop_token_ids")
    request_id = new_id(id_prefix)
    agen = engine.generate(request_id, prompt_ids, params)
    return request_id, params, agen, await _first_output(agen)


async def _sse_stream(agen: AsyncGenerator[RequestOutput, None], first: RequestOutput, head: list[str],
                      render: Callable[[RequestOutput], str | None],
                      tail: Callable[[RequestOutput], list[str]]) -> AsyncGenerator[str, None]:
    """Drive one SSE response: `head`, one event per output that `render`s, `tail` of the final output, [DONE].

    Only the final output's cumulative fields are read: the engine may keep mutating them while the request runs.
    An engine failure mid-stream becomes an `{"error": ...}` event, which OpenAI clients raise as APIError.
    """
    for event in head:
        yield event
    out = first
    try:
        async for out in _prepend(first, agen):
            event = render(out)
            if event is not None:
                yield event
    except _ENGINE_ERRORS as exc:
        yield _sse(_engine_error(exc).body())
        return
    for event in tail(out):
        yield event
    yield _SSE_DONE


async def _prepend(first: RequestOutput, rest: AsyncGenerator[RequestOutput, None]) -> AsyncGenerator[RequestOutput, None]:
    yield first
    if not first.finished:
        async for out in rest:
            yield out


class _EventStream(StreamingResponse):
    """An SSE response that closes its generators however it ends.

    Starlette cancels the send on a client disconnect and leaves the body iterator suspended; closing it (and the
    engine stream under it) here aborts the request at once instead of whenever the garbage collector runs.
    """

    def __init__(self, events: AsyncGenerator[str, None], source: AsyncGenerator[RequestOutput, None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._events = events
        self._source = source

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            await self._source.aclose()


async def _chat(state: _ServerState, body: ChatCompletionRequest) -> Response:
    state.check_model(body.model)
    body.check_supported()
    prompt_ids = await state.in_pool(_render_chat, state.tokenizer("messages"), body.template_messages(),
                                     body.add_generation_prompt is not False, body.chat_template_kwargs)
    max_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    request_id, params, agen, first = await _submit(state, body, prompt_ids, "messages", max_param, "chatcmpl")
    model, top_k = state.served_model_name, params.logprobs or 0
    want_logprobs = params.logprobs is not None
    if not body.stream:
        final = await _last_output(agen, first)
        logprobs = _chat_logprobs(state, final.logprobs or [], top_k) if want_logprobs else None
        choice = ChatChoice(message=AssistantMessage(content=final.text), logprobs=logprobs,
                            finish_reason=final.finish_reason, stop_reason=final.stop_reason)
        response = ChatCompletionResponse(id=request_id, model=model, choices=[choice],
                                          usage=UsageInfo.of(final.num_prompt_tokens, final.num_output_tokens))
        return Response(response.model_dump_json(), media_type="application/json")

    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        return _sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=choices, usage=usage))

    def render(out: RequestOutput) -> str | None:
        if not out.delta_text and not (want_logprobs and out.new_logprobs):
            return None
        logprobs = _chat_logprobs(state, out.new_logprobs or [], top_k) if want_logprobs else None
        return chunk([ChatChunkChoice(delta=ChatDelta(content=out.delta_text), logprobs=logprobs)])

    def tail(out: RequestOutput) -> list[str]:
        events = [chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=out.finish_reason,
                                         stop_reason=out.stop_reason)])]
        if body.include_usage():
            events.append(chunk([], UsageInfo.of(out.num_prompt_tokens, out.num_output_tokens)))
        return events

    head = [chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]
    return _EventStream(_sse_stream(agen, first, head, render, tail), agen)


async def _completion(state: _ServerState, body: CompletionRequest) -> Response:
    state.check_model(body.model)
    body.check_supported()
    prompt = body.single_prompt()
    if isinstance(prompt, str):
        prompt_ids = await state.in_pool(_encode, state.tokenizer("prompt"), prompt, True)
    else:
        prompt_ids = list(prompt)
        _check_token_ids(prompt_ids, state.engine.vocab_size, "prompt")
    request_id, params, agen, first = await _submit(state, body, prompt_ids, "prompt", "max_tokens", "cmpl")
    model, top_k = state.served_model_name, params.logprobs or 0
    want_logprobs = params.logprobs is not None
    if not body.stream:
        final = await _last_output(agen, first)
        logprobs = _completion_logprobs(state, final.logprobs or [], top_k, 0) if want_logprobs else None
        choice = CompletionChoice(text=final.text, logprobs=logprobs, finish_reason=final.finish_reason,
                                  stop_reason=final.stop_reason)
        response = CompletionResponse(id=request_id, model=model, choices=[choice],
                                      usage=UsageInfo.of(final.num_prompt_tokens, final.num_output_tokens))
        return Response(response.model_dump_json(), media_type="application/json")

    created = int(time.time())
    offset = 0

    def chunk(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> str:
        return _sse(CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage))

    def render(out: RequestOutput) -> str | None:
        nonlocal offset
        if not out.delta_text and not (want_logprobs and out.new_logprobs):
            return None
        logprobs = _completion_logprobs(state, out.new_logprobs or [], top_k, offset) if want_logprobs else None
        offset += len(out.delta_text)
        return chunk([CompletionChoice(text=out.delta_text, logprobs=logprobs)])

    def tail(out: RequestOutput) -> list[str]:
        events = [chunk([CompletionChoice(text="", finish_reason=out.finish_reason, stop_reason=out.stop_reason)])]
        if body.include_usage():
            events.append(chunk([], UsageInfo.of(out.num_prompt_tokens, out.num_output_tokens)))
        return events

    return _EventStream(_sse_stream(agen, first, [], render, tail), agen)


class _BearerAuth:
    """Pure ASGI auth (no BaseHTTPMiddleware, which would buffer streams and break disconnect detection)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                response = JSONResponse(error_body("Incorrect API key provided.", code="invalid_api_key"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """Condense pydantic's errors into OpenAI's one message and one `param`."""
    errors = exc.errors()
    parts, param = [], None
    for err in errors[:3]:
        if err.get("type") == "json_invalid":
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if param is None and loc:
            param = loc[0]
        where = ".".join(loc)
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    if len(errors) > 3:
        parts.append(f"(+{len(errors) - 3} more)")
    return "; ".join(parts) or "invalid request", param


def build_app(engine: AsyncEngine | LLMEngine | Callable[[], LLMEngine], served_model_name: str | None = None,
              api_key: str | None = None, max_waiting: int | None = None,
              shutdown_timeout: float = 30.0) -> FastAPI:
    """The FastAPI app. `engine` may be an AsyncEngine, an LLMEngine, or a factory that builds one on the engine
    thread at startup. The engine starts with the app's lifespan and is drained when it ends. `max_waiting=None`
    keeps an AsyncEngine's own limit (DEFAULT_MAX_WAITING otherwise)."""
    if isinstance(engine, AsyncEngine):
        async_engine = engine
        if max_waiting is not None:
            async_engine.max_waiting = max_waiting
    else:
        async_engine = AsyncEngine(engine, max_waiting=max_waiting or DEFAULT_MAX_WAITING)
    state = _ServerState(async_engine, served_model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await async_engine.start()
        state.on_started()
        logger.info("serving %s (max_model_len=%d)", state.served_model_name, async_engine.max_model_len)
        try:
            yield
        finally:
            await async_engine.shutdown(shutdown_timeout)
            state.pool.shutdown(wait=False)

    app = FastAPI(title="swiftlm", version=_version(), lifespan=lifespan)
    app.state.server = state
    app.state.engine = async_engine
    if api_key:
        app.add_middleware(_BearerAuth, api_key=api_key)

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type=kind), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal server error", type="server_error"), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _cancel_on_disconnect(request, _chat(state, body))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await _cancel_on_disconnect(request, _completion(state, body))

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.served_model_name, root=state.served_model_name,
                                         max_model_len=async_engine.max_model_len)])

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.accepting:
            return JSONResponse(error_body("the engine is not serving", type="server_error"), status_code=503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": _version()}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        state.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            if not body.messages:
                raise APIError("messages must contain at least one message", param="messages")
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            tokens = await state.in_pool(_render_chat, state.tokenizer("messages"), messages,
                                         body.add_generation_prompt is not False, body.chat_template_kwargs)
        else:
            tokens = await state.in_pool(_encode, state.tokenizer("prompt"), body.prompt,
                                         body.add_special_tokens is not False)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": async_engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        state.check_model(body.model)
        tok = state.tokenizer("tokens")
        _check_token_ids(body.tokens, async_engine.vocab_size, "tokens")
        return {"prompt": await state.in_pool(tok.decode, body.tokens)}

    @app.get("/metrics")
    async def metrics() -> Response:
        assert state.metrics is not None
        state.metrics.sync_engine_stats(async_engine.stats)
        content, content_type = state.metrics.render()
        return Response(content, media_type=content_type)

    return app


class GracefulServer(uvicorn.Server):
    """uvicorn server whose first SIGTERM/SIGINT drains the engine before uvicorn's own shutdown.

    While draining, new requests get 503 (and /health too, so balancers stop routing here); in-flight requests
    may finish for `drain_timeout` seconds, then the rest are aborted. A second signal exits at once.
    """

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self._drain_signal: int | None = None
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._drain_signal is None and not self.should_exit:
            self._drain_signal = sig
        else:
            super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_signal is not None and self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(self._drain_signal))
        return await super().on_tick(counter)

    async def _drain(self, sig: int) -> None:
        logger.info("%s: draining: no new requests; waiting up to %.0fs for %d in flight", signal.Signals(sig).name,
                    self.drain_timeout, self.engine.num_in_flight)
        await self.engine.drain(self.drain_timeout)
        # Not handle_exit: uvicorn would re-raise the recorded signal after shutting down, and the process would
        # die by SIGTERM instead of exiting 0 after the clean shutdown that the signal asked for.
        self.should_exit = True


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Server flags for `swiftlm serve` (engine flags come from EngineConfig)."""
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="0.0.0.0", help="interface to bind")
    group.add_argument("--port", type=int, default=8000, help="port to bind")
    group.add_argument("--api-key", default=os.environ.get("SWIFTLM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $SWIFTLM_API_KEY; /health and /metrics "
                            "stay open)")
    group.add_argument("--served-model-name", default=None, help="model name clients send (default: the model)")
    group.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                       help="admitted-but-not-running requests beyond which new ones get 503 + Retry-After")
    group.add_argument("--shutdown-timeout", type=float, default=30.0,
                       help="seconds in-flight requests may run after SIGTERM before they are aborted")
    group.add_argument("--uvicorn-log-level", default="info",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])


def run_server(app: FastAPI, args: argparse.Namespace) -> None:
    """Serve `app` with uvicorn until SIGTERM/SIGINT, draining gracefully."""
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                            timeout_keep_alive=5, timeout_graceful_shutdown=5)
    GracefulServer(config, app.state.engine, args.shutdown_timeout).run()


def serve(args: argparse.Namespace, engine_config: EngineConfig) -> None:
    """Entry point of `swiftlm serve`: build the engine on its own thread and serve it."""
    from swiftlm.engine.llm_engine import LLMEngine

    app = build_app(lambda: LLMEngine(engine_config), served_model_name=args.served_model_name,
                    api_key=args.api_key, max_waiting=args.max_waiting, shutdown_timeout=args.shutdown_timeout)
    run_server(app, args)
