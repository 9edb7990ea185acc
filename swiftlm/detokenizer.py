"""Incremental detokenization for streaming, with stop-string matching.

Decoding the whole output on every step costs O(n) per token; instead each step decodes a small window of
tokens (prefix_offset..end) and diffs it against the window's already-consumed head (prefix_offset..read_offset).
Two kinds of text are held back rather than emitted: a trailing U+FFFD, which may be an incomplete UTF-8
sequence that the next token completes, and a suffix that could be the start of a stop string.
"""
from __future__ import annotations

from typing import Protocol

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """What the detokenizer needs from a tokenizer: HF tokenizers and `tokenizers.Tokenizer` both fit."""

    def decode(self, ids: list[int], /, skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Per-request streaming text state.

    Invariant: with no stop string hit, the deltas from `append` plus `finish()` concatenate to
    `tokenizer.decode(all_output_ids, skip_special_tokens=...)`. Decoding uses only output tokens, never prompt
    context, which is what keeps that invariant exact (a prompt ending inside a multi-byte character must not
    absorb the output's continuation bytes). `prompt_token_ids` is kept for callers that report it.
    """

    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 stop: list[str] | None = None, include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.token_ids: list[int] = []
        self.stop_reason: str | None = None
        self._done = False
        self._prefix_offset = 0
        self._read_offset = 0
        # Characters of the window's text past decode(ids[prefix:read]) already consumed while a trailing
        # incomplete character kept the offsets from moving.
        self._consumed = 0
        # Decoded text not yet emitted because it may be the start of a stop string.
        self._pending = ""
        self._stop_prefixes = {s[:k] for s in self.stop for k in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stop), default=0)
        self._chunks: list[str] = []
        self._text = ""

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of the returned deltas)."""
        if self._chunks:
            self._text += "".join(self._chunks)
            self._chunks.clear()
        return self._text

    @property
    def finished(self) -> bool:
        """True once a stop string matched or `finish()` ran; no more tokens may be appended."""
        return self._done

    def append(self, new_token_ids: list[int]) -> tuple[str, str | None]:
        """Add generated tokens; return (text safe to emit now, stop string matched or None)."""
        if self._done:
            raise RuntimeError("append() after the detokenizer finished (stop string matched or finish() called)")
        self.token_ids.extend(new_token_ids)
        return self._emit(self._decode_step(final=False), final=False)

    def finish(self) -> str:
        """End the request without a further stop match and return everything still held back.

        A stop string that only completes in this flushed tail (possible only if it contains U+FFFD) still cuts
        the output, and `stop_reason` records it. Returns "" once finished.
        """
        if self._done:
            return ""
        delta, _ = self._emit(self._decode_step(final=True), final=True)
        self._done = True
        return delta

    def _decode_step(self, final: bool) -> str:
        """New stable text from the token window; moves the offsets only past complete characters."""
        ids = self.token_ids
        if self._read_offset == len(ids) and not final:
            return ""
        skip = self.skip_special_tokens
        head = self.tokenizer.decode(ids[self._prefix_offset:self._read_offset], skip_special_tokens=skip)
        window = self.tokenizer.decode(ids[self._prefix_offset:], skip_special_tokens=skip)
        start = len(head) + self._consumed
        if not final and window.endswith(_REPLACEMENT):
            stable = window[start:].rstrip(_REPLACEMENT)
            self._consumed += len(stable)
            return stable
        self._prefix_offset, self._read_offset, self._consumed = self._read_offset, len(ids), 0
        return window[start:]

    def _emit(self, new_text: str, final: bool) -> tuple[str, str | None]:
        if not self.stop:
            self._chunks.append(new_text)
            return new_text, None
        buf = self._pending + new_text
        hit = self._find_stop(buf, len(self._pending))
        if hit is not None:
            pos, stop = hit
            end = pos + len(stop) if self.include_stop_str_in_output else pos
            delta, self._pending, self.stop_reason, self._done = buf[:end], "", stop, True
        else:
            hold = 0 if final else self._held_suffix_len(buf)
            delta, self._pending = buf[:len(buf) - hold], buf[len(buf) - hold:]
        self._chunks.append(delta)
        return delta, self.stop_reason

    def _find_stop(self, buf: str, old_len: int) -> tuple[int, str] | None:
        """The stop occurrence that completes first (earliest end, then longest), as char-by-char decoding would
        see it. Only occurrences ending in the new text count: older ones would have matched already."""
        best: tuple[int, int, str] | None = None
        for stop in self.stop:
            pos = buf.find(stop, max(0, old_len - len(stop) + 1))
            if pos < 0:
                continue
            key = (pos + len(stop), -len(stop), stop)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        end, neg_len, stop = best
        return end + neg_len, stop

    def _held_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            if buf[-k:] in self._stop_prefixes:
                return k
        return 0
