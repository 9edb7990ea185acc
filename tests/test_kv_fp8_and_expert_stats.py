"""FP8 KV cache (with checkpoint scales) and MoE expert-load statistics through the engine, on CPU."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from swiftlm import SamplingParams
from swiftlm.engine.llm import LLM
from swiftlm.testing import make_random_checkpoint, tiny_config

PROMPT = list(range(5, 60))


def _first_logits(llm: LLM) -> torch.Tensor:
    runner = llm.engine.model_runner
    sampler, seen = runner.sampler, []

    def record(logits, batch):
        seen.append(logits.detach().clone())
        return sampler(logits, batch)
    runner.sampler = record
    llm.generate([PROMPT], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return seen[1][0]  # the first decode step reads every prompt token back from the cache


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> str:
    return make_random_checkpoint(tiny_config("qwen3"), str(tmp_path_factory.mktemp("dense")), dtype="float32",
                                  seed=5)


def test_fp8_kv_cache_with_checkpoint_scales(dense, tmp_path) -> None:
    """Scales stored in the checkpoint are applied on write and read alike: with k_scale 4 and v_scale 0.25
    the FP8-cache model stays as close to the 16/32-bit one as with unit scales (~0.1 on this sensitive random
    model; a scale used on one side only would be off by a factor of 4 and fail)."""
    ref = _first_logits(LLM(dense))
    unit = _rel(_first_logits(LLM(dense, kv_cache_dtype="fp8")), ref)
    scaled_dir = tmp_path / "scaled"
    scaled_dir.mkdir()
    for f in os.listdir(dense):
        shutil.copy(os.path.join(dense, f), scaled_dir / f)
    tensors = load_file(str(scaled_dir / "model.safetensors"))
    for layer in range(2):
        tensors[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(4.0)
        tensors[f"model.layers.{layer}.self_attn.v_proj.output_scale"] = torch.tensor(0.25)
    save_file(tensors, str(scaled_dir / "model.safetensors"))
    llm = LLM(str(scaled_dir), kv_cache_dtype="fp8")
    attn = llm.engine.model_runner.attn_layers[1]
    assert (attn.k_scale, attn.v_scale) == (4.0, 0.25)
    scaled = _rel(_first_logits(llm), ref)
    assert 1e-4 < unit < 0.2 and 1e-4 < scaled < 0.2, (unit, scaled)


def test_expert_load_counts_every_routed_token(tmp_path) -> None:
    cfg = tiny_config("qwen3_moe")
    path = make_random_checkpoint(cfg, str(tmp_path / "moe"), dtype="float32", seed=2)
    llm = LLM(path, expert_stats=True)
    new = 6
    llm.generate([PROMPT, PROMPT[:17]], SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    load = llm.engine.expert_load(reset=True)
    routed = (len(PROMPT) + len(PROMPT[:17]) + 2 * (new - 1)) * cfg["num_experts_per_tok"]
    assert load.shape == (cfg["num_hidden_layers"], cfg["num_experts"])
    assert load.sum(dim=1).tolist() == [routed] * cfg["num_hidden_layers"]
    assert llm.engine.expert_load().sum() == 0
    with pytest.raises(ValueError, match="mixture-of-experts"):
        LLM(make_random_checkpoint(tiny_config("qwen3"), str(tmp_path / "d"), dtype="float32"), expert_stats=True)
