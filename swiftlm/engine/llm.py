"""Offline API: `LLM(model).generate(prompts, params)` and `LLM.chat(messages)`."""
from __future__ import annotations

import dataclasses
from typing import Sequence as Seq

from swiftlm.config import EngineConfig
from swiftlm.engine.llm_engine import LLMEngine
from swiftlm.outputs import RequestOutput
from swiftlm.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """Runs the engine to completion over a batch of prompts. Keyword arguments are EngineConfig fields."""

    def __init__(self, model: str | None = None, **kwargs: object) -> None:
        fields = {f.name for f in dataclasses.fields(EngineConfig)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(f"unknown engine options {unknown}; valid ones: {sorted(fields)}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))  # type: ignore[arg-type]
        self._counter = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs in the order of `prompts`. A single prompt may be a string or a list of token ids."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params):
            rid = f"offline-{self._counter}"
            self._counter += 1
            self.engine.add_request(rid, prompt, p)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[Message] | list[list[Message]],
             params: SamplingParams | Seq[SamplingParams] | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the checkpoint's chat template to one conversation or a list of them, then generate."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [list(self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt,
                                                           tokenize=True, return_dict=False))
                   for c in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(request_ids), desc="generate", unit="req", dynamic_ncols=True)
        wanted = set(request_ids)
        while len(final) < len(wanted) and self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    final[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [final[r] for r in request_ids]
