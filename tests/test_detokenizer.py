"""Incremental detokenization: streamed deltas must add up to the full decode, never show half a character, and
cut exactly at stop strings without ever emitting text that a stop string later swallows."""
from __future__ import annotations

import random

import pytest

from swiftlm.demo import demo_model_path
from swiftlm.detokenizer import IncrementalDetokenizer


class ByteTokenizer:
    """One token per byte (ids 0..255) plus one special token (256), decoded like a byte-level BPE."""

    SPECIAL = 256

    def __init__(self) -> None:
        self.decoded_lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self.decoded_lengths.append(len(ids))
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i == self.SPECIAL:
                parts.append(bytes(run).decode("utf-8", errors="replace"))
                run = []
                if not skip_special_tokens:
                    parts.append("<|sp|>")
            else:
                run.append(i)
        parts.append(bytes(run).decode("utf-8", errors="replace"))
        return "".join(parts)


def encode_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk_sizes: list[int] | None = None,
           ) -> tuple[list[str], str | None]:
    """Feed `ids` in chunks; return all deltas (finish() included unless stopped) and the stop reason."""
    deltas: list[str] = []
    i = 0
    sizes = iter(chunk_sizes or [])
    while i < len(ids):
        n = next(sizes, 1)
        delta, stop = detok.append(ids[i:i + n])
        deltas.append(delta)
        i += n
        if stop is not None:
            return deltas, stop
    deltas.append(detok.finish())
    return deltas, None


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_path(str(tmp_path_factory.mktemp("cache"))))


@pytest.mark.parametrize("skip_special", [True, False])
def test_random_streams_match_full_decode(hf_tokenizer, skip_special: bool) -> None:
    rng = random.Random(1234)
    vocab = len(hf_tokenizer)
    for _ in range(150):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 50))]
        detok = IncrementalDetokenizer(hf_tokenizer, [1, 2, 3], skip_special, [], False)
        deltas, stop = stream(detok, ids, [rng.randrange(1, 4) for _ in ids])
        expected = hf_tokenizer.decode(ids, skip_special_tokens=skip_special)
        assert stop is None
        assert "".join(deltas) == expected
        assert detok.text == expected


def test_multibyte_text_never_emits_partial_characters(hf_tokenizer) -> None:
    text = "Grüße 😀 from 東京 and Zürich — 🇺🇳 flags, e\u0301 combining, 한국어 텍스트."
    ids = hf_tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # the tokenizer splits these characters across byte tokens
    detok = IncrementalDetokenizer(hf_tokenizer, [], True, [], False)
    deltas, _ = stream(detok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert deltas[-1] == ""  # nothing was still held when the stream ended on a complete character


def test_partial_utf8_is_held_then_released() -> None:
    tok = ByteTokenizer()
    emoji = encode_bytes("😀")
    detok = IncrementalDetokenizer(tok, [], True, [], False)
    assert detok.append(encode_bytes("ab") + emoji[:2]) == ("ab", None)
    assert detok.append([emoji[2]]) == ("", None)
    assert detok.append([emoji[3]]) == ("😀", None)
    assert detok.text == "ab😀"


def test_invalid_bytes_flush_at_finish() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], True, [], False)
    ids = [0x61, 0xF0, 0x9F]  # "a" + a truncated 4-byte sequence that never completes
    assert detok.append(ids) == ("a", None)
    assert detok.finish() == tok.decode(ids)[1:]
    assert detok.text == tok.decode(ids)
    with pytest.raises(RuntimeError):
        detok.append([0x62])


def test_special_tokens_skipped_or_kept() -> None:
    tok = ByteTokenizer()
    ids = encode_bytes("x") + [ByteTokenizer.SPECIAL] + encode_bytes("y")
    for skip, expected in ((True, "xy"), (False, "x<|sp|>y")):
        detok = IncrementalDetokenizer(tok, [], skip, [], False)
        deltas, _ = stream(detok, ids)
        assert "".join(deltas) == expected


def test_decoding_work_is_bounded_per_step() -> None:
    tok = ByteTokenizer()
    ids = encode_bytes("streaming text with ünïcödé and emoji 🚀 " * 40)
    expected = tok.decode(ids)
    tok.decoded_lengths.clear()
    detok = IncrementalDetokenizer(tok, [], True, [], False)
    stream(detok, ids)
    assert detok.text == expected
    assert max(tok.decoded_lengths) <= 8  # a window of a few tokens, not the whole output


def test_stop_string_spanning_tokens_cuts_output(hf_tokenizer) -> None:
    text = "The answer is 42. STOP then more text follows"
    ids = hf_tokenizer.encode(text)
    pieces = [hf_tokenizer.decode([i]) for i in ids]
    assert not any("STOP" in p for p in pieces)  # the stop string only exists across several tokens
    for include, expected in ((False, "The answer is 42. "), (True, "The answer is 42. STOP")):
        detok = IncrementalDetokenizer(hf_tokenizer, [], True, ["STOP"], include)
        deltas, stop = stream(detok, ids)
        assert stop == "STOP"
        assert "".join(deltas) == expected == detok.text
        assert detok.stop_reason == "STOP" and detok.finished
        assert detok.finish() == ""


def test_possible_stop_prefix_is_held_back() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], True, ["world peace"], False)
    assert detok.append(encode_bytes("hello wor")) == ("hello ", None)
    assert detok.append(encode_bytes("ld ")) == ("", None)
    assert detok.append(encode_bytes("w")) == ("world ", None)  # "world w" is no stop prefix, but "w" is
    assert detok.append(encode_bytes("ar")) == ("war", None)
    assert detok.text == "hello world war"


def test_held_prefix_released_by_finish() -> None:
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [], True, ["</answer>"], False)
    deltas, stop = stream(detok, encode_bytes("result: 7 </ans"), [100])
    assert stop is None
    assert deltas == ["result: 7 ", "</ans"]
    assert detok.text == "result: 7 </ans"


def test_stop_string_within_one_chunk_and_across_chunks() -> None:
    tok = ByteTokenizer()
    ids = encode_bytes("abc<|END|>def")
    for sizes in ([1] * len(ids), [len(ids)], [4, 3, 100]):
        detok = IncrementalDetokenizer(tok, [], True, ["<|END|>"], True)
        deltas, stop = stream(detok, ids, sizes)
        assert (stop, "".join(deltas)) == ("<|END|>", "abc<|END|>")


def test_first_completed_stop_wins_regardless_of_chunking() -> None:
    tok = ByteTokenizer()
    ids = encode_bytes("xabcdy")
    results = set()
    for sizes in ([1] * 6, [6], [2, 4], [3, 3]):
        detok = IncrementalDetokenizer(tok, [], True, ["abcd", "bc"], False)
        deltas, stop = stream(detok, ids, sizes)
        results.add(("".join(deltas), stop))
    assert results == {("xa", "bc")}


def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Cut `text` where a stop string first completes, reading one character at a time."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[:end if include else end - len(stop)], stop
    return text, None


def test_random_stop_strings_match_reference() -> None:
    rng = random.Random(7)
    tok = ByteTokenizer()
    for _ in range(400):
        text = "".join(rng.choice("ab é") for _ in range(rng.randrange(0, 30)))
        stops = ["".join(rng.choice("abé") for _ in range(rng.randrange(1, 5))) for _ in range(rng.randrange(1, 3))]
        include = rng.random() < 0.5
        ids = encode_bytes(text)
        detok = IncrementalDetokenizer(tok, [], True, stops, include)
        emitted = ""
        stop = None
        i = 0
        while i < len(ids) and stop is None:
            n = rng.randrange(1, 4)
            delta, stop = detok.append(ids[i:i + n])
            emitted += delta
            i += n
            seen = tok.decode(ids[:i]).rstrip("\ufffd")
            if stop is None:
                # nothing emitted so far may be part of a stop string that completes later
                assert reference_stop(text, stops, include)[0].startswith(emitted)
                assert seen.startswith(emitted)
        if stop is None:
            emitted += detok.finish()
        assert (emitted, stop) == reference_stop(text, stops, include)
