"""The engine against transformers on tiny random Qwen3/Qwen2 checkpoints (fp32, CPU): tokens and logits."""
from __future__ import annotations

import pytest
import torch

from swiftlm import SamplingParams
from swiftlm.engine.llm import LLM
from swiftlm.layers import attention as attention_layer
from swiftlm.testing import make_random_checkpoint, tiny_config

PROMPT_LENS = [3, 17, 40, 9]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def checkpoint(request, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp(request.param)
    overrides = {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}} \
        if request.param == "qwen2" else {}
    return make_random_checkpoint(tiny_config(request.param, **overrides), str(out), dtype="float32", seed=7)


@pytest.fixture(scope="module")
def reference(checkpoint) -> tuple[list[list[int]], list[list[int]], list[torch.Tensor]]:
    """Prompts, transformers' greedy continuations and its logits at each generated position."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    outputs, logits = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            steps = []
            for _ in range(NEW_TOKENS):
                last = model(ids).logits[0, -1]
                steps.append(last)
                ids = torch.cat([ids, last.argmax().view(1, 1)], dim=1)
            outputs.append(ids[0, len(prompt):].tolist())
            logits.append(torch.stack(steps))
    return prompts, outputs, logits


class LogitRecorder:
    """Wraps the sampler to keep the logits it is given, keyed by step."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.calls: list[torch.Tensor] = []

    def __call__(self, logits, batch):
        self.calls.append(logits.detach().clone())
        return self.sampler(logits, batch)


GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("engine_kwargs", [
    {},
    {"max_num_batched_tokens": 8},                      # forces chunked prefill
    {"num_kv_blocks": 8, "block_size": 8},              # 7 usable blocks: forces preemption
    {"max_num_batched_tokens": 13, "fresh_align": 4},   # fresh prompts: aligned rows and bottom-right tails apart
], ids=["plain", "chunked", "preempt", "fresh-split"])
def test_greedy_matches_transformers(checkpoint, reference, engine_kwargs, monkeypatch) -> None:
    prompts, expected, _ = reference
    engine_kwargs = dict(engine_kwargs)
    if "fresh_align" in engine_kwargs:
        monkeypatch.setattr(attention_layer, "FRESH_ALIGN", engine_kwargs.pop("fresh_align"))
    llm = LLM(checkpoint, **engine_kwargs)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    if "num_kv_blocks" in engine_kwargs:
        assert llm.engine.scheduler.num_preemptions > 0
    stats = llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks  # every block came back


def test_logits_match_transformers(checkpoint, reference) -> None:
    prompts, expected, ref_logits = reference
    llm = LLM(checkpoint)
    recorder = LogitRecorder(llm.engine.model_runner.sampler)
    llm.engine.model_runner.sampler = recorder
    llm.generate(prompts[1], GREEDY, use_tqdm=False)
    got = torch.stack([c[0] for c in recorder.calls])
    want = ref_logits[1]
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-4, f"relative logit error {rel:.2e}"
    assert got[0].argmax() == want[0].argmax()


def test_bad_requests_raise_clear_errors(checkpoint) -> None:
    llm = LLM(checkpoint, max_model_len=64)
    engine = llm.engine
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="context"):
        engine.add_request("b", list(range(64)), GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request("c", [1, 2, 10**9], GREEDY)
    engine.add_request("d", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("d", [1, 2, 3], GREEDY)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(TypeError, match="unknown engine options"):
        LLM(checkpoint, max_num_sequences=3)


def test_abort_frees_blocks(checkpoint) -> None:
    llm = LLM(checkpoint)
    engine = llm.engine
    engine.add_request("x", list(range(30)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.get_stats().num_free_blocks < engine.get_stats().num_total_blocks
    engine.abort_request("x")
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("x", "abort")]
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not engine.has_unfinished_requests()


def test_max_tokens_capped_by_context(checkpoint) -> None:
    llm = LLM(checkpoint, max_model_len=32)
    out = llm.generate([list(range(28))], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert out.num_output_tokens == 4 and out.finish_reason == "length"
