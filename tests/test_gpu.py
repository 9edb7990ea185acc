"""GPU checks run on the device machine (`pytest -m gpu`): bf16 engine vs transformers, CUDA graphs vs eager."""
from __future__ import annotations

import gc

import pytest
import torch

from swiftlm import SamplingParams
from swiftlm.testing import make_random_checkpoint, tiny_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def release(llm) -> None:
    """Drop an engine's GPU memory now. A failed test's traceback keeps its `llm` alive, so dropping the name is
    not enough: the next test's engine would size its KV cache around the leftover one."""
    llm.engine = None
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture
def make_llm():
    from swiftlm.engine.llm import LLM
    made = []

    def make(*args, **kwargs):
        made.append(LLM(*args, **kwargs))
        return made[-1]

    yield make
    for llm in made:
        release(llm)

NEW = 32


@pytest.fixture(scope="module", params=["qwen3", "qwen2"])
def checkpoint(request, tmp_path_factory) -> str:
    cfg = tiny_config(request.param, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=64, num_hidden_layers=4)
    return make_random_checkpoint(cfg, str(tmp_path_factory.mktemp(request.param)), dtype="bfloat16", seed=3)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, 1000, (n,), generator=gen).tolist() for n in (5, 33, 128, 300)]


class LogitRecorder:
    def __init__(self, sampler) -> None:
        self.sampler, self.calls = sampler, []

    def __call__(self, logits, batch):
        self.calls.append(logits.detach().clone())
        return self.sampler(logits, batch)


def test_bf16_logits_and_greedy_close_to_transformers(checkpoint, make_llm) -> None:
    """Our bf16 run is as close to transformers' fp32 reference as transformers' own bf16 run is:
    last-token logits within 2x its relative error (+ 1e-3), and greedy tokens over the first 32 generated
    positions agree with fp32's at least as often (less 3 points). Teacher-forced: every position gets fp32's
    prefix, so one near-tie of this random model does not decide all later positions."""
    from transformers import AutoModelForCausalLM

    llm = make_llm(checkpoint, gpu_memory_utilization=0.15)
    ref32 = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).cuda().eval()
    ref16 = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).cuda().eval()
    recorder = LogitRecorder(llm.engine.model_runner.sampler)
    llm.engine.model_runner.sampler = recorder
    greedy1 = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm.generate(_prompts(), greedy1, use_tqdm=False)
    first = recorder.calls[0]
    forced, expected, hf16_tokens = [], [], []
    for i, prompt in enumerate(_prompts()):
        ids = torch.tensor([prompt], device="cuda")
        with torch.no_grad():
            l32 = ref32(ids).logits[0, -1].float()
            l16 = ref16(ids).logits[0, -1].float()
            full = ref32.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            hf16_tokens += ref16(full).logits[0, len(prompt) - 1: -1].argmax(-1).tolist()
        ours_err = ((first[i] - l32).norm() / l32.norm()).item()
        hf_err = ((l16 - l32).norm() / l32.norm()).item()
        assert ours_err <= 2 * hf_err + 1e-3, (ours_err, hf_err)
        full = full[0].tolist()
        for j in range(NEW):
            forced.append(full[: len(prompt) + j])
            expected.append(full[len(prompt) + j])
    got = [o.token_ids[0] for o in llm.generate(forced, greedy1, use_tqdm=False)]
    ours = sum(g == e for g, e in zip(got, expected)) / len(expected)
    theirs = sum(g == e for g, e in zip(hf16_tokens, expected)) / len(expected)
    assert ours >= theirs - 0.03, (ours, theirs)


def test_cuda_graphs_equal_eager(checkpoint, make_llm) -> None:
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    graph = make_llm(checkpoint, gpu_memory_utilization=0.15, max_num_seqs=16)
    assert graph.engine.model_runner.graphs
    with_graphs = [o.token_ids for o in graph.generate(_prompts(), params, use_tqdm=False)]
    release(graph)
    eager = make_llm(checkpoint, gpu_memory_utilization=0.15, max_num_seqs=16, enforce_eager=True)
    assert not eager.engine.model_runner.graphs
    assert [o.token_ids for o in eager.generate(_prompts(), params, use_tqdm=False)] == with_graphs


def test_seeded_sampling_is_batch_independent(checkpoint, make_llm) -> None:
    llm = make_llm(checkpoint, gpu_memory_utilization=0.15, max_num_seqs=16)
    p = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=42, ignore_eos=True)
    alone = llm.generate([_prompts()[1]], p, use_tqdm=False)[0].token_ids
    mixed = llm.generate(_prompts(), [SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True), p,
                                      SamplingParams(max_tokens=7, ignore_eos=True), p], use_tqdm=False)
    assert mixed[1].token_ids == alone


def test_async_scheduling_equals_sync(checkpoint, make_llm) -> None:
    """Pending ids filled on the device, samples copied back behind events: the same tokens and logprobs as the
    synchronous engine, bit for bit (no request stops early, so every step's batch is the same in both)."""
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=4, ignore_eos=True),
              SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=17, temperature=1.0, top_k=20, seed=8, ignore_eos=True)]

    def run(async_scheduling: bool) -> list[tuple]:
        llm = make_llm(checkpoint, gpu_memory_utilization=0.15, max_num_seqs=16, async_scheduling=async_scheduling)
        outs = llm.generate(_prompts(), params, use_tqdm=False)
        release(llm)
        return [(o.token_ids, [(lp.token_id, lp.logprob, lp.top) for lp in o.logprobs or []]) for o in outs]

    assert run(True) == run(False)


def test_tuned_gemv_configs_match_fp32_math() -> None:
    """Every shape the linear layers route through the decode GEMV, at the largest M of its bucket."""
    from swiftlm.kernels import gemv as gk
    from swiftlm.kernels.quant import FP8_DTYPE, per_token_quant_fp8
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {}
    for n, k, bucket, kind in sorted(gk.GEMV_CONFIGS):
        if (n, k, kind) not in weights:
            w = torch.randn(n, k, device="cuda", generator=gen) / k ** 0.5
            weights = {(n, k, kind): per_token_quant_fp8(w) if kind == "fp8" else (w.bfloat16(), None)}
        w, scale = weights[(n, k, kind)]
        x = torch.randn(bucket, k, device="cuda", generator=gen).bfloat16()
        assert gk.use_gemv(x, w)
        ref = gk.gemv_ref(x, w, scale, out_dtype=torch.float32)
        err = ((gk.gemv(x, w, scale).float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, ((n, k, bucket, kind), err)
        assert w.dtype == (FP8_DTYPE if kind == "fp8" else torch.bfloat16)


def test_expert_load_skips_graph_padding(tmp_path, make_llm) -> None:
    """One prompt alone (5 tokens through the 32-token prefill graph, then batch-1 decode graphs), then three
    together (decoding in the batch-4 graph, one padding row): the expert counts hold exactly the real tokens
    (the KV-sizing profile run and every padding token count nothing)."""
    cfg = tiny_config("qwen3_moe")
    path = make_random_checkpoint(cfg, str(tmp_path / "moe"), dtype="bfloat16", seed=2)
    llm = make_llm(path, expert_stats=True, gpu_memory_utilization=0.15, max_num_seqs=8)
    runner = llm.engine.model_runner
    assert 4 in runner.graphs and 32 in runner.prefill_graphs
    assert llm.engine.expert_load().sum() == 0
    params, new = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), 6
    batches = [_prompts()[:1], _prompts()[:3]]
    for prompts in batches:
        llm.generate(prompts, params, use_tqdm=False)
    tokens = sum(len(p) + new - 1 for prompts in batches for p in prompts)
    routed = tokens * cfg["num_experts_per_tok"]
    assert llm.engine.expert_load().sum(dim=1).tolist() == [routed] * cfg["num_hidden_layers"]


def test_decode_attention_compiles_once_across_split_counts_and_table_widths() -> None:
    """The split count and the block-table width vary between start-up's warm-up and later steps; a Triton
    variant compiled inside a request stalls it for ~1 s, so the decode kernel must not specialize on them."""
    import triton
    import triton.language as tl
    from triton import knobs

    from swiftlm.kernels.attention import paged_decode_attention

    @triton.jit
    def fresh_kernel(x_ptr):  # never compiled before: proves the hook sees compiles
        tl.store(x_ptr, 1.0)

    compiles: list[str] = []
    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = lambda **kw: compiles.append(kw["repr"]) or False
    try:
        fresh_kernel[(1,)](torch.zeros(1, device="cuda"))
        gen = torch.Generator(device="cuda").manual_seed(0)
        k_cache = torch.randn(64, 16, 2, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn(64, 16, 2, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
        q = torch.randn(3, 8, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
        seq_lens = torch.tensor([100, 37, 250], dtype=torch.int32, device="cuda")
        for width, splits in [(32, 16), (40, 5), (17, 3), (33, 7)]:
            tables = torch.randint(0, 64, (3, width), generator=gen, device="cuda", dtype=torch.int32)
            paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, 0.125, splits)
            if width == 32:
                warmed = len(compiles)
        torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_cache_hook = previous
    assert "fresh_kernel" in compiles[0] and compiles[warmed:] == []
