"""LLMEngine: requests in, one scheduler + model step at a time (the next one launched before the last one's
tokens are read), RequestOutputs out. Single-threaded."""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

import torch

from swiftlm.config import EngineConfig
from swiftlm.engine.kv_cache import BlockAllocator
from swiftlm.engine.model_runner import ModelRunner, StepSamples
from swiftlm.engine.scheduler import Scheduler, SchedulerOutput
from swiftlm.engine.sequence import Sequence
from swiftlm.loader.checkpoint import load_generation_config, load_hf_config, resolve_model_path
from swiftlm.outputs import EngineStats, RequestMetrics, RequestOutput, TokenLogprob
from swiftlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str):
    """The checkpoint's HF tokenizer, or None for a weights-only directory (then prompts must be token ids)."""
    from transformers import AutoTokenizer
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: only token-id prompts will work", path)
        return None
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("no tokenizer loaded from %s (%s): only token-id prompts will work", path, exc)
        return None


@dataclass
class _LaunchedStep:
    """A step on the device whose tokens the host has not read: the sequences that sample, in sample-row order."""

    seqs: list[Sequence]
    samples: StepSamples
    sync: bool


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_path = resolve_model_path(config.model, config.revision,
                                             weights=config.load_format != "dummy")
        self.model_name = config.model or "swiftlm-demo"
        self.hf_config = load_hf_config(self.model_path)
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_path)
        self.eos_token_ids = self._eos_ids()
        config_len = int(self.hf_config.get("max_position_embeddings", 32768))
        max_len = config.max_model_len or config_len
        self.model_runner = ModelRunner(config, self.hf_config, self.model_path, max_len)
        allocator = BlockAllocator(self.model_runner.num_blocks, config.block_size)
        capacity = allocator.num_usable_blocks * config.block_size
        if capacity < max_len:
            logger.warning("KV cache holds %d tokens: max_model_len lowered from %d", capacity, max_len)
            max_len = capacity
        self.max_model_len = max_len
        self.vocab_size = self.model_runner.vocab_size
        self.scheduler = Scheduler(allocator, config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []
        self._in_flight: _LaunchedStep | None = None
        self._rng = random.Random(config.seed)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    def _eos_ids(self) -> list[int]:
        ids: set[int] = set()
        eos = load_generation_config(self.model_path).get("eos_token_id", self.hf_config.get("eos_token_id"))
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, list):
            ids.update(int(e) for e in eos)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return sorted(ids)

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        token_ids = self._tokenize(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens, but the context is {self.max_model_len} "
                             "tokens and at least one must be left to generate")
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        room = self.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        seq = Sequence(request_id=request_id, prompt_token_ids=token_ids, params=params,
                       seed=params.seed if params.seed is not None else self._rng.getrandbits(63),
                       max_tokens=max_tokens, eos_token_ids=[] if params.ignore_eos else self.eos_token_ids,
                       metrics=RequestMetrics(arrival_time=arrival_time or time.monotonic()))
        if self.tokenizer is not None:
            from swiftlm.detokenizer import IncrementalDetokenizer
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens,
                                                     params.stop, params.include_stop_str_in_output)
        elif params.stop:
            raise ValueError("stop strings need a tokenizer, and this model has none")
        self.requests[request_id] = seq
        self.scheduler.add(seq)

    def _tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass the prompt as token ids")
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("a token-id prompt must be a list of integers")
        return list(prompt)

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return
        self.scheduler.finish(seq)
        seq.finish_reason = "abort"
        seq.metrics.finished_time = time.monotonic()
        self._pending.append(self._output(seq, [], "", None))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or self._in_flight is not None

    def get_stats(self) -> EngineStats:
        alloc = self.scheduler.allocator
        return EngineStats(num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
                           num_free_blocks=alloc.num_free_blocks, num_total_blocks=alloc.num_usable_blocks,
                           num_preemptions=self.scheduler.num_preemptions,
                           prompt_tokens_total=self.prompt_tokens_total,
                           generation_tokens_total=self.generation_tokens_total)

    def expert_load(self, reset: bool = False) -> torch.Tensor:
        """Tokens routed to each expert, `[num_layers, num_experts]` on the host (dense layers are zero rows).

        Needs `expert_stats=True`. Padding rows of CUDA-graph batches are not counted.
        """
        model = self.model_runner.model
        if not self.config.expert_stats:
            raise ValueError("expert statistics are off: create the engine with expert_stats=True")
        counts = model.expert_stats().cpu()
        if reset:
            model.reset_expert_stats()
        return counts

    def model_weight_bytes(self) -> int:
        model = self.model_runner.model
        return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
            b.numel() * b.element_size() for n, b in model.named_buffers() if "cos_sin" not in n)

    # ---- stepping ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch the next step, then read the tokens of the step before it (asynchronous
        scheduling) or of this one (synchronous: `async_scheduling=False`, or a batch that sampled a penalized
        request, whose next step needs its real output tokens). Returns the outputs read."""
        outputs, self._pending = self._pending, []
        previous, self._in_flight = self._in_flight, None
        launched = None
        try:
            launched = self._launch(self.scheduler.schedule(), previous)
            if previous is not None:
                outputs += self._read(previous)
            if launched is not None and (launched.sync or not self.config.async_scheduling):
                outputs += self._read(launched)
            else:
                self._in_flight = launched
        except BaseException:
            for step in (previous, launched):
                if step is not None:
                    self._drop(step)
            self._in_flight = None
            raise
        return outputs

    def _launch(self, batch: SchedulerOutput, previous: _LaunchedStep | None) -> _LaunchedStep | None:
        if batch.is_empty:
            return None
        now = time.monotonic()
        for item in batch.scheduled:
            if item.seq.metrics.first_scheduled_time is None:
                item.seq.metrics.first_scheduled_time = now
                self.prompt_tokens_total += item.seq.num_prompt_tokens
        pending = previous.samples.device.token_ids if previous is not None else None
        sample_rows, samples = self.model_runner.execute(batch, pending)
        for item in batch.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
        if samples is None:
            return None
        seqs = [batch.scheduled[row].seq for row in sample_rows]
        for row, seq in enumerate(seqs):
            seq.num_pending += 1
            seq.pending_row = row
        return _LaunchedStep(seqs, samples, sync=any(seq.params.penalized for seq in seqs))

    def _read(self, step: _LaunchedStep) -> list[RequestOutput]:
        """Wait for a step's samples and append each to its sequence; sequences that finished meanwhile (a stop
        read from the step before, an abort) drop theirs."""
        sampled = step.samples.result()
        token_ids = sampled.token_ids.tolist()
        logprob_rows = self._logprob_rows(sampled, len(token_ids))
        now = time.monotonic()
        outputs = []
        for k, seq in enumerate(step.seqs):
            if not seq.is_finished:
                seq.num_pending -= 1
                outputs.append(self._append_token(seq, token_ids[k], logprob_rows[k] if logprob_rows else None,
                                                  now))
        return outputs

    def _drop(self, step: _LaunchedStep) -> None:
        """A step failed with this one launched: its sequences cannot be trusted to continue, so they end."""
        for seq in step.seqs:
            if not seq.is_finished:
                self.abort_request(seq.request_id)

    @staticmethod
    def _logprob_rows(sampled, n: int) -> list[tuple[float, list[int], list[float]]] | None:
        if sampled.logprobs is None:
            return None
        lps = sampled.logprobs.tolist()
        ids = sampled.top_ids.tolist() if sampled.top_ids is not None else [[] for _ in range(n)]
        vals = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else [[] for _ in range(n)]
        return list(zip(lps, ids, vals))

    def _append_token(self, seq: Sequence, token: int, logprob_row, now: float) -> RequestOutput:
        metrics = seq.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        seq.token_ids.append(token)
        self.generation_tokens_total += 1
        new_lp: list[TokenLogprob] | None = None
        if seq.logprobs is not None and logprob_row is not None:
            lp, top_ids, top_vals = logprob_row
            k = seq.params.logprobs or 0
            new_lp = [TokenLogprob(token, lp, dict(zip(top_ids[:k], top_vals[:k])))]
            seq.logprobs.extend(new_lp)
        finish, stop_reason = None, None
        delta = ""
        if token in seq.eos_token_ids or token in seq.params.stop_token_ids:
            finish, stop_reason = "stop", (None if token in seq.eos_token_ids else token)
        elif seq.detokenizer is not None:
            delta, matched = seq.detokenizer.append([token])
            if matched is not None:
                finish, stop_reason = "stop", matched
        if finish is None and len(seq.token_ids) - seq.num_prompt_tokens >= seq.max_tokens:
            finish = "length"
        if finish is not None and seq.detokenizer is not None and not isinstance(stop_reason, str):
            delta += seq.detokenizer.finish()
        if finish is not None:
            seq.finish_reason, seq.stop_reason = finish, stop_reason
            seq.num_pending = 0  # a token sampled after the stop is never read
            metrics.finished_time = now
            self.scheduler.finish(seq)
            self.requests.pop(seq.request_id, None)
        return self._output(seq, [token], delta, new_lp)

    def _output(self, seq: Sequence, new_ids: list[int], delta: str,
                new_lp: list[TokenLogprob] | None) -> RequestOutput:
        text = seq.detokenizer.text if seq.detokenizer is not None else ""
        return RequestOutput(request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
                             token_ids=seq.output_token_ids, new_token_ids=new_ids, text=text, delta_text=delta,
                             finished=seq.is_finished, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                             logprobs=seq.logprobs, new_logprobs=new_lp, metrics=seq.metrics)
