"""Asyncio front for the synchronous LLMEngine.

The engine is single-threaded and its `step()` runs the model, so it lives on one dedicated thread: the event
loop only enqueues commands and receives outputs, and never waits on GPU work. Commands (add/abort/stop) go in
through a thread-safe queue; outputs come back to per-request asyncio queues, one `call_soon_threadsafe` per step.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from swiftlm.outputs import EngineStats, RequestOutput
from swiftlm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from swiftlm.engine.llm_engine import LLMEngine
    from swiftlm.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

DEFAULT_MAX_WAITING = 1024


class EngineOverloadedError(Exception):
    """The waiting queue is full; the client should retry after `retry_after` seconds (HTTP 503)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineShutdownError(Exception):
    """The server is draining or stopped and takes no new work (HTTP 503)."""


class EngineInternalError(Exception):
    """Something failed inside the engine thread while serving this request (HTTP 500)."""


@dataclass
class _Stream:
    """One request's mailbox (read on the loop) and timing (written on the engine thread)."""

    request_id: str
    queue: asyncio.Queue[RequestOutput | BaseException]
    arrival: float
    first_token_time: float | None = None
    last_token_time: float | None = None


@dataclass
class _Add:
    stream: _Stream
    prompt: str | list[int]
    params: SamplingParams


@dataclass
class _Abort:
    request_id: str
    error: BaseException | None = None


@dataclass
class _Stop:
    done: threading.Event = field(default_factory=threading.Event)


_Command = _Add | _Abort | _Stop


class AsyncEngine:
    """Owns an LLMEngine on a dedicated thread and serves `generate()` streams to asyncio code.

    `engine` is an LLMEngine or a zero-argument factory; a factory is called on the engine thread so that
    everything the engine sets up (CUDA graphs, streams) belongs to the thread that steps it.
    """

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], max_waiting: int = DEFAULT_MAX_WAITING,
                 retry_after: int = 1) -> None:
        if max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {max_waiting}")
        is_engine = hasattr(engine, "step") and not isinstance(engine, type)
        self._factory: Callable[[], LLMEngine] | None = None if is_engine else engine
        self._engine: LLMEngine | None = engine if self._factory is None else None
        self.max_waiting = max_waiting
        self.retry_after = retry_after
        self.metrics: ServerMetrics | None = None
        self.tokenizer: Any = None
        self.model_name = ""
        self.max_model_len = 0
        self.vocab_size = 0

        self._inbox: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._streams: dict[str, _Stream] = {}
        self._idle: asyncio.Event | None = None
        self._accepting = True
        self._stopped = False

        self._lock = threading.Lock()
        self._stats = EngineStats(0, 0, 0, 0, 0, 0, 0)
        self._unsubmitted = 0

    async def start(self) -> None:
        """Start the engine thread (building the engine there if given a factory) and wait until it is ready."""
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._idle = asyncio.Event()
            self._idle.set()
            self._thread = threading.Thread(target=self._run, name="swiftlm-engine", daemon=True)
            self._thread.start()
        await asyncio.wrap_future(self._ready)

    @property
    def engine(self) -> LLMEngine | None:
        """The wrapped engine (None until started). It belongs to the engine thread: do not call it from elsewhere."""
        return self._engine

    @property
    def stats(self) -> EngineStats:
        """The engine's stats as of its last step or command batch (the engine itself is not thread-safe)."""
        with self._lock:
            return self._stats

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def accepting(self) -> bool:
        """True while started, not draining, and the engine thread is alive."""
        return self._accepting and not self._stopped and self._ready.done() and self._thread is not None \
            and self._thread.is_alive()

    async def generate(self, request_id: str, prompt: str | list[int],
                       params: SamplingParams) -> AsyncGenerator[RequestOutput, None]:
        """Submit a request and yield its outputs until it finishes.

        Raises EngineOverloadedError/EngineShutdownError before admission, the engine's ValueError if it rejects
        the request, EngineInternalError if the engine fails while running it. Closing or cancelling the
        iterator early aborts the request so its KV blocks are freed.
        """
        stream = self._submit(request_id, prompt, params)
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._release(request_id)
            if not finished:
                self._inbox.put(_Abort(request_id))

    def _submit(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> _Stream:
        if not self.accepting:
            raise EngineShutdownError("the server is shutting down" if not self._accepting or self._stopped
                                      else "the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        with self._lock:
            waiting = self._stats.num_waiting + self._unsubmitted
            if waiting >= self.max_waiting:
                raise EngineOverloadedError(
                    f"the server is overloaded ({waiting} requests waiting); retry later", self.retry_after)
            self._unsubmitted += 1
        stream = _Stream(request_id, asyncio.Queue(), time.monotonic())
        self._streams[request_id] = stream
        assert self._idle is not None
        self._idle.clear()
        self._inbox.put(_Add(stream, prompt, params))
        return stream

    def _release(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if not self._streams and self._idle is not None:
            self._idle.set()

    async def drain(self, timeout: float) -> None:
        """Stop accepting requests, let in-flight ones finish for up to `timeout` seconds, then abort the rest."""
        self._accepting = False
        assert self._idle is not None
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            leftover = list(self._streams)
            logger.warning("shutdown timeout reached: aborting %d in-flight requests", len(leftover))
            for request_id in leftover:
                self._inbox.put(_Abort(request_id, EngineShutdownError("the server shut down before the request "
                                                                       "finished")))

    async def shutdown(self, timeout: float) -> None:
        """Drain, then stop the engine thread."""
        if self._thread is None or self._stopped:
            return
        await self.drain(timeout)
        stop = _Stop()
        self._inbox.put(stop)
        if self._thread.is_alive():
            await asyncio.to_thread(stop.done.wait, 30.0)
        self._stopped = True

    # ---- engine thread ----

    def _run(self) -> None:
        try:
            if self._factory is not None:
                self._engine = self._factory()
            engine = self._engine
            assert engine is not None
            self.tokenizer = _private_copy(engine.tokenizer)
            self.model_name = engine.model_name
            self.max_model_len = engine.max_model_len
            self.vocab_size = len(self.tokenizer) if self.tokenizer is not None else engine.vocab_size
            self._publish_stats(engine, 0)
        except BaseException as exc:
            logger.exception("engine failed to start")
            self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        tracked: dict[str, _Stream] = {}
        try:
            self._serve(engine, tracked)
        finally:
            # Normally reached through _Stop; if the thread dies any other way, nobody may be left waiting.
            self._stopped = True
            self._fail_all(engine, tracked, EngineShutdownError("the engine stopped"))
            self._fail_queued()

    def _serve(self, engine: LLMEngine, tracked: dict[str, _Stream]) -> None:
        after_error = False
        while True:
            try:
                # Block when idle, and after an error until new work arrives, so a broken engine cannot spin.
                block = after_error or not engine.has_unfinished_requests()
                commands = [self._inbox.get()] if block else []
                after_error = False
                while True:
                    try:
                        commands.append(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                self._apply(engine, commands, tracked)
                stop = next((c for c in commands if isinstance(c, _Stop)), None)
                if stop is not None:
                    stop.done.set()
                    return
                if engine.has_unfinished_requests():
                    self._step(engine, tracked)
            except Exception:
                logger.exception("engine step failed; failing its in-flight requests")
                self._fail_all(engine, tracked, EngineInternalError("internal engine error"))
                self._publish_stats(engine, 0)
                after_error = True

    def _fail_queued(self) -> None:
        """Fail adds still in the inbox once the thread is gone."""
        deliveries: list[tuple[_Stream, RequestOutput | BaseException]] = []
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Add):
                deliveries.append((command.stream, EngineShutdownError("the engine stopped")))
            elif isinstance(command, _Stop):
                command.done.set()
        self._deliver(deliveries)

    def _apply(self, engine: LLMEngine, commands: list[_Command], tracked: dict[str, _Stream]) -> None:
        deliveries: list[tuple[_Stream, RequestOutput | BaseException]] = []
        try:
            for command in commands:
                if isinstance(command, _Add):
                    self._add(engine, command, tracked, deliveries)
                elif isinstance(command, _Abort):
                    stream = tracked.pop(command.request_id, None)
                    if stream is None:
                        continue
                    try:
                        engine.abort_request(command.request_id)
                    except Exception:
                        logger.exception("abort_request failed for %s", command.request_id)
                    self._count_finished(stream, "abort", 0, 0)
                    if command.error is not None:
                        deliveries.append((stream, command.error))
        finally:
            self._publish_stats(engine, sum(isinstance(c, _Add) for c in commands))
            self._deliver(deliveries)

    def _add(self, engine: LLMEngine, command: _Add, tracked: dict[str, _Stream],
             deliveries: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
        stream = command.stream
        try:
            engine.add_request(stream.request_id, command.prompt, command.params, arrival_time=stream.arrival)
        except ValueError as exc:
            deliveries.append((stream, exc))
        except Exception as exc:
            logger.exception("add_request failed for %s", stream.request_id)
            deliveries.append((stream, EngineInternalError(f"internal engine error: {exc}")))
            self._count_finished(stream, "error", 0, 0)
        else:
            tracked[stream.request_id] = stream

    def _step(self, engine: LLMEngine, tracked: dict[str, _Stream]) -> None:
        outputs = engine.step()
        now = time.monotonic()
        deliveries: list[tuple[_Stream, RequestOutput | BaseException]] = []
        for out in outputs:
            stream = tracked.get(out.request_id)
            if stream is None:
                continue
            if out.new_token_ids:
                if stream.first_token_time is None:
                    stream.first_token_time = now
                    if self.metrics is not None:
                        self.metrics.ttft.observe(now - stream.arrival)
                elif self.metrics is not None and stream.last_token_time is not None:
                    self.metrics.itl.observe(now - stream.last_token_time)
                stream.last_token_time = now
            if out.finished:
                del tracked[out.request_id]
                self._count_finished(stream, out.finish_reason or "stop", out.num_prompt_tokens,
                                     out.num_output_tokens)
            deliveries.append((stream, out))
        self._publish_stats(engine, 0)
        self._deliver(deliveries)

    def _fail_all(self, engine: LLMEngine, tracked: dict[str, _Stream], error: BaseException) -> None:
        deliveries: list[tuple[_Stream, RequestOutput | BaseException]] = []
        for request_id, stream in list(tracked.items()):
            try:
                engine.abort_request(request_id)
            except Exception:
                logger.exception("abort_request failed for %s", request_id)
            self._count_finished(stream, "error" if isinstance(error, EngineInternalError) else "abort", 0, 0)
            deliveries.append((stream, error))
        tracked.clear()
        self._deliver(deliveries)

    def _count_finished(self, stream: _Stream, reason: str, prompt_tokens: int, generation_tokens: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_finished(reason, time.monotonic() - stream.arrival, prompt_tokens,
                                          generation_tokens)

    def _publish_stats(self, engine: LLMEngine, num_submitted: int) -> None:
        """Snapshot stats and retire submitted adds in one step, so the waiting count never dips in between.

        Called before outputs are delivered, so a client that sees its request finish also sees stats that
        include it (and its freed KV blocks)."""
        try:
            stats = engine.get_stats()
        except Exception:
            logger.exception("get_stats failed")
            stats = self._stats
        with self._lock:
            self._stats = stats
            self._unsubmitted -= num_submitted

    def _deliver(self, deliveries: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
        if not deliveries or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(_put_all, deliveries)
        except RuntimeError:
            logger.warning("event loop closed; dropping %d outputs", len(deliveries))


def _put_all(deliveries: list[tuple[_Stream, RequestOutput | BaseException]]) -> None:
    for stream, item in deliveries:
        stream.queue.put_nowait(item)


def _private_copy(tokenizer: Any) -> Any:
    """A tokenizer of the server's own, so request tokenization never shares Rust state with the engine thread."""
    try:
        return copy.deepcopy(tokenizer)
    except (TypeError, copy.Error):
        logger.warning("tokenizer cannot be copied; sharing the engine's")
        return tokenizer
