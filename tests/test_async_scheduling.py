"""Asynchronous scheduling: the engine launches step n+1 before it reads step n's tokens. Everything a request
sees must equal the synchronous engine's: tokens, text, stops, logprobs, under chunking and preemption.

The engines run on the CPU in fp32 (also on the GPU machine), where a request that stops one step late cannot
flip a neighbour's token through another batch shape; `tests/test_gpu.py` compares the two on CUDA."""
from __future__ import annotations

import pytest
import torch

from swiftlm import SamplingParams
from swiftlm.demo import demo_model_path
from swiftlm.engine.llm import LLM
from swiftlm.kernels.sampled_ids import fill_sampled_ids, fill_sampled_ids_ref
from swiftlm.kernels.triton_support import TRITON_INTERPRETED
from swiftlm.testing import make_random_checkpoint, tiny_config


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    demo = demo_model_path(str(tmp_path_factory.mktemp("demo")))
    return make_random_checkpoint(tiny_config("qwen3"), str(tmp_path_factory.mktemp("qwen3")), dtype="float32",
                                  seed=11, tokenizer_from=demo)


def _llm(checkpoint: str, **kwargs) -> LLM:
    return LLM(checkpoint, device="cpu", **kwargs)


def _prompts() -> list[list[int]]:
    """Requests 2 and 3 repeat request 0's prompt: their stops come from its greedy output."""
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 19, 14, 8, 16)]
    return prompts[:2] + [prompts[0], prompts[0]] + prompts[2:]


def _params(reference: list) -> list[SamplingParams]:
    """One request per feature; the stop token and stop string are taken from a greedy run so they do fire."""
    greedy_out = reference[0]
    return [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[greedy_out.token_ids[4]], ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, stop=[greedy_out.text[6:10]], ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.0, logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.7, seed=9, repetition_penalty=1.3, ignore_eos=True),
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
    ]


def _summary(out) -> tuple:
    top = [sorted(lp.top) for lp in out.logprobs] if out.logprobs is not None else None
    return out.token_ids, out.text, out.finish_reason, out.stop_reason, top


def _logprob_values(out) -> torch.Tensor:
    """Sampled and top logprobs; they may differ in the last float bits, since a request that stopped is
    still in the step after (so neighbours' batch shapes differ from the synchronous run's)."""
    return torch.tensor([[lp.logprob, *(v for _, v in sorted(lp.top.items()))] for lp in out.logprobs])


@pytest.mark.parametrize("engine_kwargs", [
    {},
    {"max_num_batched_tokens": 8},                      # chunked prefill: pending tokens inside prompt chunks
    {"num_kv_blocks": 6, "block_size": 8},              # preemption while a step is in flight
], ids=["plain", "chunked", "preempt"])
def test_async_outputs_equal_sync(checkpoint, engine_kwargs) -> None:
    prompts = _prompts()
    sync_llm = _llm(checkpoint, async_scheduling=False, **engine_kwargs)
    first = sync_llm.generate(prompts[:1], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                              use_tqdm=False)
    params = _params(first)
    want = sync_llm.generate(prompts, params, use_tqdm=False)
    async_llm = _llm(checkpoint, **engine_kwargs)
    got = async_llm.generate(prompts, params, use_tqdm=False)
    assert [_summary(o) for o in got] == [_summary(o) for o in want]
    torch.testing.assert_close(_logprob_values(got[4]), _logprob_values(want[4]), rtol=0, atol=1e-5)
    assert want[2].finish_reason == "stop" and want[3].finish_reason == "stop"
    if "num_kv_blocks" in engine_kwargs:
        assert async_llm.engine.scheduler.num_preemptions > 0
    stats = async_llm.engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert not async_llm.engine.has_unfinished_requests()


def _count_launches(engine) -> list[int]:
    launches: list[int] = []
    execute = engine.model_runner.execute

    def counted(batch, pending=None):
        launches.append(batch.num_tokens)
        return execute(batch, pending)

    engine.model_runner.execute = counted
    return launches


def test_tokens_are_read_one_step_late_and_no_step_is_wasted_on_length(checkpoint) -> None:
    engine = _llm(checkpoint).engine
    launches = _count_launches(engine)
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    seen = [[len(o.token_ids) for o in engine.step()] for _ in range(4)]
    assert seen == [[], [1], [2], [3]]
    assert launches == [3, 1, 1]  # the prefill and two decodes: the third token ends the request by length
    assert not engine.has_unfinished_requests()

    sync = _llm(checkpoint, async_scheduling=False).engine
    sync.add_request("a", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert [[len(o.token_ids) for o in sync.step()] for _ in range(3)] == [[1], [2], [3]]


def test_abort_with_a_step_in_flight(checkpoint) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = _llm(checkpoint).generate([[4, 5, 6, 7]], params, use_tqdm=False)[0].token_ids
    engine = _llm(checkpoint).engine
    engine.add_request("keep", [4, 5, 6, 7], params)
    engine.add_request("drop", [9, 8, 7], params)
    engine.step()
    engine.step()
    engine.abort_request("drop")
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["drop"].finish_reason == "abort"
    assert finals["keep"].token_ids == alone
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_a_failed_step_ends_its_requests_and_the_engine_goes_on(checkpoint) -> None:
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine = _llm(checkpoint).engine
    execute = engine.model_runner.execute
    calls = {"n": 0}

    def failing(batch, pending=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device fault")
        return execute(batch, pending)

    engine.model_runner.execute = failing
    engine.add_request("x", [1, 2, 3, 4], params)
    with pytest.raises(RuntimeError, match="device fault"):
        for _ in range(4):
            engine.step()
    aborted = engine.step()
    assert [(o.request_id, o.finish_reason) for o in aborted] == [("x", "abort")]
    engine.add_request("y", [1, 2, 3, 4], params)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].request_id == "y" and outs[-1].finish_reason == "length" and len(outs[-1].token_ids) == 6
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.skipif(not TRITON_INTERPRETED, reason="needs TRITON_INTERPRET=1")
def test_fill_kernel_matches_reference() -> None:
    ids = torch.arange(40, dtype=torch.int32)
    positions = torch.tensor([3, 17, 39, 0], dtype=torch.int32)
    rows = torch.tensor([2, 0, 5, 2], dtype=torch.int32)
    sampled = torch.tensor([101, 102, 103, 104, 105, 106], dtype=torch.int64)
    want = ids.clone()
    fill_sampled_ids_ref(want, positions, rows, sampled)
    got = ids.clone()
    fill_sampled_ids(got, positions, rows, sampled, max_pairs=8)
    assert torch.equal(got, want)
    assert got[[3, 17, 39, 0]].tolist() == [103, 101, 106, 103] and got[1] == 1
    with pytest.raises(ValueError, match="at most 2 pairs"):
        fill_sampled_ids(got, positions, rows, sampled, max_pairs=2)
