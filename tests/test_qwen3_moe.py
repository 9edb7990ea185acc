"""Qwen3-MoE end to end against transformers on a tiny random checkpoint that transformers itself wrote (fp32).

The checkpoint has a dense `mlp_only_layers` layer between two sparse ones. Without CUDA the MoE and attention
kernels run under TRITON_INTERPRET=1, so the engine exercises both fused-MoE paths: decode batches have at
most 8 (token, expert) pairs (low-latency path), the 40-token prompt's prefill has 80 (grouped path).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from swiftlm import SamplingParams  # noqa: E402
from swiftlm.engine.llm import LLM  # noqa: E402
from swiftlm.models.qwen3_moe import MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

PROMPT_LENS = [5, 40, 2]
NEW_TOKENS = 4
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
HF_CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                 norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], max_position_embeddings=256,
                 rms_norm_eps=1e-6, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """(checkpoint dir, transformers model). Weights are redrawn so routing is decisive (transformers
    initializes the router to zeros) and logits are peaked enough for a stable greedy argmax."""
    from transformers import Qwen3MoeConfig
    from transformers import Qwen3MoeForCausalLM as HFQwen3Moe

    torch.manual_seed(0)
    model = HFQwen3Moe(Qwen3MoeConfig(**HF_CONFIG)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif "embed_tokens" in name or "lm_head" in name:
                param.copy_(torch.randn_like(param) * 4.0 / math.sqrt(param.shape[-1]))
            else:
                param.copy_(torch.randn_like(param) / math.sqrt(param.shape[-1]))
    path = str(tmp_path_factory.mktemp("qwen3_moe"))
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, HF_CONFIG["vocab_size"], (n,), generator=gen).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def expected(hf_model, prompts) -> list[list[int]]:
    _, model = hf_model
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False)
            outs.append(ids[0, len(prompt):].tolist())
    return outs


class LogitRecorder:
    """Wraps the sampler to keep the logits it is given."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.calls: list[torch.Tensor] = []

    def __call__(self, logits, batch):
        self.calls.append(logits.detach().clone())
        return self.sampler(logits, batch)


def test_config_reads_transformers_spelling(hf_model) -> None:
    import json

    with open(os.path.join(hf_model[0], "config.json")) as f:
        raw = json.load(f)
    moe = MoeConfig.from_dict(raw)
    assert (moe.num_experts, moe.top_k, moe.moe_intermediate_size) == (8, 2, 32)
    assert [moe.is_sparse(i) for i in range(3)] == [True, False, True]
    assert moe == MoeConfig.from_dict({**raw, "num_experts": 8})


@pytest.mark.parametrize("engine_kwargs", [{}, {"max_num_batched_tokens": 16}], ids=["plain", "chunked"])
def test_greedy_matches_transformers_generate(hf_model, prompts, expected, engine_kwargs) -> None:
    llm = LLM(hf_model[0], dtype="float32", **engine_kwargs)
    assert isinstance(llm.engine.model_runner.model, Qwen3MoeForCausalLM)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == expected


def test_logits_and_expert_stats(hf_model, prompts) -> None:
    path, model = hf_model
    llm = LLM(path, dtype="float32")
    runner = llm.engine.model_runner
    ours = runner.model
    ours.enable_expert_stats()
    recorder = LogitRecorder(runner.sampler)
    runner.sampler = recorder
    prompt = prompts[1]
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]

    ids = torch.tensor([prompt + out.token_ids])
    with torch.no_grad():
        hf = model(ids, output_router_logits=True)
    want = hf.logits[0, len(prompt) - 1: -1]
    got = torch.stack([c[0] for c in recorder.calls])
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-4, f"relative logit error {rel:.2e}"

    # Every token fed through the model (prompt + all generated but the last) was routed once per sparse layer.
    stats = ours.expert_stats().cpu()
    fed = ids.shape[1] - 1
    assert stats.shape == (3, 8)
    assert stats[1].sum() == 0  # the dense layer
    sparse = [i for i in range(3) if i != 1]
    router_logits = dict(zip(sparse, hf.router_logits, strict=True))
    for layer in sparse:
        hf_ids = torch.topk(router_logits[layer][:fed].float(), 2, dim=-1).indices
        assert torch.equal(stats[layer], torch.bincount(hf_ids.flatten(), minlength=8))
    ours.reset_expert_stats()
    assert ours.expert_stats().sum() == 0


def test_incomplete_expert_set_is_not_reported_loaded(hf_model) -> None:
    from swiftlm.loader.checkpoint import iterate_weights, load_hf_config

    path, _ = hf_model
    model = Qwen3MoeForCausalLM(load_hf_config(path), torch.float32)
    weights = ((n, t) for n, t in iterate_weights(path, torch.device("cpu"))
               if n != "model.layers.2.mlp.experts.5.up_proj.weight")
    loaded = model.load_weights(weights)
    assert "model.layers.2.mlp.experts.w13_weight" not in loaded
    assert {"model.layers.2.mlp.experts.w2_weight", "model.layers.0.mlp.experts.w13_weight",
            "model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate_up_proj.weight"} <= loaded
    assert set(dict(model.named_parameters())) - loaded == {"model.layers.2.mlp.experts.w13_weight"}
