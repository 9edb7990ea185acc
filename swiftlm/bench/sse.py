"""Parsing OpenAI-style SSE streams into token timings, kept free of I/O so it can be tested with scripted events."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from swiftlm.bench.metrics import RequestRecord, split_gap


class SSEDecoder:
    """Incremental server-sent-events parser: raw bytes in, complete `data:` payloads out.

    Events end at a blank line; multi-line data is joined with newlines; comment lines (`:` pings) are dropped.
    Lines are split on bytes first so a UTF-8 character cut across two network reads decodes correctly.
    """

    def __init__(self) -> None:
        self._tail = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        *lines, self._tail = (self._tail + chunk).split(b"\n")
        return [event for line in lines if (event := self._line(line)) is not None]

    def flush(self) -> list[str]:
        """Dispatch what the stream left without a closing blank line (lenient toward sloppy servers)."""
        return self.feed(b"\n\n")

    def _line(self, raw: bytes) -> str | None:
        line = raw.rstrip(b"\r")
        if not line:
            if not self._data:
                return None
            event, self._data = "\n".join(self._data), []
            return event
        if line.startswith(b":"):
            return None
        name, _, value = line.partition(b":")
        if name == b"data":
            self._data.append(value.removeprefix(b" ").decode("utf-8", errors="replace"))
        return None


def _choice_text(choice: dict[str, Any]) -> str:
    """Generated text of one streamed choice: completions `text`, or chat delta content / reasoning."""
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return "".join(delta.get(k) or "" for k in ("content", "reasoning_content", "reasoning"))


def _logprob_count(choice: dict[str, Any]) -> int | None:
    """Tokens in this chunk according to its logprobs (exact), or None if the chunk carries none."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    entries = lp.get("content") if "content" in lp else lp.get("tokens")
    return len(entries) if isinstance(entries, list) else None


@dataclass
class StreamAccumulator:
    """One request's stream state: fed `(payload, arrival_time)` pairs, it yields TTFT, ITLs, counts and checks.

    Tokens per chunk come from, in order of trust: the chunk's logprobs, a per-chunk cumulative `usage` (vLLM's
    continuous usage stats) minus what was counted so far, else 1 for a chunk with non-empty text. Only that last
    guess can be wrong (a server may hold back partial UTF-8 and ship two tokens as one chunk), so `exact_counts`
    records whether it was needed.
    """

    start: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens_counted: int = 0
    exact_counts: bool = True
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False
    error: str | None = None
    error_detail: str = ""

    def add(self, payload: str, now: float) -> None:
        if payload.strip() == "[DONE]":
            self.done = True
            return
        try:
            data = json.loads(payload)
        except json.JSONDecodeError:
            self._fail("invalid JSON in stream", payload[:200])
            return
        if not isinstance(data, dict):
            self._fail("invalid JSON in stream", payload[:200])
            return
        if data.get("error") is not None or data.get("object") == "error":
            self._fail("error event in stream", json.dumps(data.get("error", data))[:300])
            return
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        choices = data.get("choices") or []
        if choices:
            self._add_choice(choices[0], usage, now)
        if usage is not None:
            self.usage = usage

    def _add_choice(self, choice: dict[str, Any], usage: dict[str, Any] | None, now: float) -> None:
        text = _choice_text(choice)
        n = _logprob_count(choice)
        if n is None and usage is not None and usage.get("completion_tokens") is not None:
            n = int(usage["completion_tokens"]) - self.tokens_counted
        if n is None:
            n = 1 if text else 0
            self.exact_counts = self.exact_counts and not text
        if n > 0:
            if self.first_token_time is None:
                self.first_token_time = now
            else:
                self.itl.extend(split_gap(now - self.last_token_time, n))
            self.last_token_time = now
            self.tokens_counted += n
        self.text.append(text)
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]

    def _fail(self, reason: str, detail: str) -> None:
        if self.error is None:
            self.error, self.error_detail = reason, detail

    @property
    def terminated(self) -> bool:
        """Whether the server ended the stream on purpose ([DONE] or a finish_reason) rather than dropping it."""
        return self.done or self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        """Output tokens: the server's usage figure when sent, else what the chunks add up to."""
        if self.usage is not None and self.usage.get("completion_tokens") is not None:
            return int(self.usage["completion_tokens"])
        return self.tokens_counted

    def to_record(self, prompt_tokens: int) -> RequestRecord:
        """Close the stream: success needs a token and a deliberate end, as a truncated stream is not a result."""
        if self.usage is not None and self.usage.get("prompt_tokens") is not None:
            prompt_tokens = int(self.usage["prompt_tokens"])
        record = RequestRecord(success=False, start_time=self.start, prompt_tokens=prompt_tokens,
                               finish_reason=self.finish_reason)
        if self.error is not None:
            record.error, record.error_detail = self.error, self.error_detail
        elif self.first_token_time is None:
            record.error = "no tokens received"
        elif not self.terminated:
            record.error = "truncated stream"
            record.error_detail = f"stream ended after {self.tokens_counted} tokens without finish_reason or [DONE]"
        else:
            record.success = True
        if self.first_token_time is not None:
            record.ttft = self.first_token_time - self.start
            record.latency = self.last_token_time - self.start
            record.itl = self.itl
            record.output_tokens = self.completion_tokens
        return record
