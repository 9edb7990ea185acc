"""A CPU-instant stand-in for LLMEngine that follows its documented API (docs/DESIGN.md).

It lets server tests exercise what the real engine cannot be made to do on demand: fail inside `step()`,
or run slowly enough to hold requests in flight. Tokens come from a seeded hash, so output is deterministic
for greedy and seeded requests; only ids that decode to printable ASCII are emitted, so incremental text is exact.
"""
from __future__ import annotations

import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from swiftlm.outputs import EngineStats, RequestOutput, TokenLogprob
from swiftlm.sampling_params import SamplingParams

_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@cache
def _base_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello world the quick brown fox jumps over the lazy dog"] * 10, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = _CHAT_TEMPLATE
    return hf


@dataclass
class _Req:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    rng: random.Random | None = None


class FakeEngine:
    """Single-threaded like LLMEngine; `fail_next_step` makes the next `step()` raise, `step_delay` slows it."""

    def __init__(self, max_model_len: int = 256, max_num_seqs: int = 8, num_blocks: int = 256, block_size: int = 4,
                 step_delay: float = 0.0) -> None:
        self.tokenizer = _base_tokenizer()
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.step_delay = step_delay
        self.fail_next_step = False
        self.steps = 0
        self._waiting: deque[_Req] = deque()
        self._running: list[_Req] = []
        self._prompt_total = 0
        self._gen_total = 0
        self._printable = [i for i in range(3, len(self.tokenizer))
                           if (s := self.tokenizer.decode([i])).isascii() and s.isprintable()]

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if any(r.request_id == request_id for r in (*self._waiting, *self._running)):
            raise ValueError(f"duplicate request id {request_id!r}")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}")
        rng = None if params.greedy else random.Random(params.seed) if params.seed is not None else random.Random()
        self._waiting.append(_Req(request_id, ids, params, rng=rng))

    def abort_request(self, request_id: str) -> None:
        self._waiting = deque(r for r in self._waiting if r.request_id != request_id)
        self._running = [r for r in self._running if r.request_id != request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running)

    def _blocks(self, req: _Req) -> int:
        return math.ceil((len(req.prompt_ids) + len(req.out_ids) + 1) / self.block_size)

    def _used_blocks(self) -> int:
        return sum(self._blocks(r) for r in self._running)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected engine failure")
        if self.step_delay:
            time.sleep(self.step_delay)
        while self._waiting and len(self._running) < self.max_num_seqs \
                and self._used_blocks() + self._blocks(self._waiting[0]) <= self.num_blocks:
            req = self._waiting.popleft()
            self._prompt_total += len(req.prompt_ids)
            self._running.append(req)
        outputs = [self._advance(req) for req in self._running]
        self._running = [r for r, o in zip(self._running, outputs) if not o.finished]
        return outputs

    def _advance(self, req: _Req) -> RequestOutput:
        p = req.params
        pos = len(req.out_ids)
        if req.rng is None:
            token = self._printable[(sum(req.prompt_ids) * 31 + pos * 17) % len(self._printable)]
        else:
            token = req.rng.choice(self._printable)
        req.out_ids.append(token)
        self._gen_total += 1
        new_lps = None
        if p.logprobs is not None:
            lp = -0.25 - (token % 7) * 0.1
            alternatives = [t for t in self._printable[:p.logprobs + 1] if t != token][:p.logprobs]
            top = {token: lp, **{t: lp - 1.0 - i for i, t in enumerate(alternatives)}}
            new_lps = [TokenLogprob(token, lp, top)]
            req.logprobs.extend(new_lps)
        text = self.tokenizer.decode(req.out_ids)
        finish, stop_reason = None, None
        hit = next((s for s in p.stop if s in text), None)
        if hit is not None:
            text = text[:text.index(hit) + (len(hit) if p.include_stop_str_in_output else 0)]
            finish, stop_reason = "stop", hit
        elif token in p.stop_token_ids and pos + 1 >= p.min_tokens:
            finish, stop_reason = "stop", token
        elif pos + 1 >= (p.max_tokens or self.max_model_len - len(req.prompt_ids)) \
                or len(req.prompt_ids) + pos + 1 >= self.max_model_len:
            finish = "length"
        delta = text[len(req.text):]
        req.text = text
        return RequestOutput(request_id=req.request_id, prompt_token_ids=list(req.prompt_ids),
                             token_ids=list(req.out_ids), new_token_ids=[token], text=text, delta_text=delta,
                             finished=finish is not None, finish_reason=finish, stop_reason=stop_reason,
                             logprobs=list(req.logprobs) if p.logprobs is not None else None, new_logprobs=new_lps)

    def get_stats(self) -> EngineStats:
        return EngineStats(num_running=len(self._running), num_waiting=len(self._waiting),
                           num_free_blocks=self.num_blocks - self._used_blocks(), num_total_blocks=self.num_blocks,
                           num_preemptions=0, prompt_tokens_total=self._prompt_total,
                           generation_tokens_total=self._gen_total)
