"""Quantized checkpoints end to end (CPU): a tiny fp32 Qwen3 checkpoint rewritten in compressed-tensors
FP8-dynamic layout and in AutoAWQ GEMM layout, plus online `--quantization fp8`, all load through the engine
and stay close to the unquantized model.

Metric: relative L2 error of the last-token logits, ||a - b|| / ||b||. The tiny random model amplifies
weight noise (fp8 weight rounding alone moves its logits by ~15%), so absolute bounds would say little.
Instead each quantized engine is compared with transformers running the same model with the *dequantized*
weights:
- AWQ is W4A16: the engine must match the dequantized model to 1e-3 (the same math up to summation order);
  a misplaced shard, a wrong nibble order or a wrong zero point gives errors of order 1.
- FP8 PTPC also rounds activations per token (e4m3: <= 2^-4 relative per value, about as much noise as the
  weight rounding), so the engine's error against the fp32 model may be at most 1.6x the weight-only error
  (independent noises add to ~1.41x).
- A compressed-tensors FP8-dynamic checkpoint and online `--quantization fp8` of the same weights quantize
  identically, so their logits must agree to 1e-5.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from swiftlm import SamplingParams
from swiftlm.engine.llm import LLM
from swiftlm.kernels.awq import awq_quantize_ref
from swiftlm.kernels.quant import quantize_weight_fp8_ref
from swiftlm.testing import fp8_dynamic_quant_config, make_random_checkpoint, tiny_config

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8_DYNAMIC = fp8_dynamic_quant_config(["lm_head"])
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    cfg = tiny_config("qwen3", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
    return make_random_checkpoint(cfg, str(tmp_path_factory.mktemp("base")), dtype="float32", seed=11)


def _rewrite(base: str, out: str, quant_config: dict, convert) -> str:
    shutil.copytree(base, out)
    file = os.path.join(out, "model.safetensors")
    tensors = load_file(file)
    new: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if any(f".{p}.weight" in name for p in LINEARS):
            new.update(convert(name[: -len(".weight")], t))
        else:
            new[name] = t
    save_file(new, file)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = quant_config
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


def _fp8(prefix: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    q, scale = quantize_weight_fp8_ref(w)
    return {f"{prefix}.weight": q, f"{prefix}.weight_scale": scale}


def _awq(prefix: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    qweight, qzeros, scales = awq_quantize_ref(w, 128)
    return {f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": scales}


def _step_logits(path: str, prompt: list[int], steps: int = 1, **kwargs) -> tuple[list[torch.Tensor], list[int]]:
    """The engine's logits at each of `steps` greedy steps and the tokens it chose, on the CPU (fp32, as the
    bounds here assume) even where CUDA exists unless `device` says otherwise."""
    llm = LLM(path, **{"device": "cpu", **kwargs})
    runner = llm.engine.model_runner
    seen: list[torch.Tensor] = []
    sampler = runner.sampler

    def record(logits, batch):
        seen.append(logits[0].detach().float().cpu().clone())
        return sampler(logits, batch)
    runner.sampler = record
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    out = llm.generate([prompt], params, use_tqdm=False)
    return seen, list(out[0].token_ids)


def _last_logits(path: str, prompt: list[int], **kwargs) -> torch.Tensor:
    """The engine's last-token logits of `prompt` (see `_step_logits`)."""
    return _step_logits(path, prompt, **kwargs)[0][0]


PROMPT = list(range(5, 45))


def _hf_logits(path: str, dequantize=None, tokens: list[int] = PROMPT) -> torch.Tensor:
    """transformers' fp32 logits [len(tokens), vocab], with every linear weight replaced by dequantize(w) if
    given."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        if dequantize is not None:
            for name, p in model.named_parameters():
                if any(f".{lin}.weight" in name for lin in LINEARS):
                    p.copy_(dequantize(p))
        return model(torch.tensor([tokens])).logits[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _fp8_dequant(w: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_weight_fp8_ref(w)
    return q.float() * scale


def _awq_dequant(w: torch.Tensor) -> torch.Tensor:
    from swiftlm.kernels.awq import awq_dequantize_ref
    qweight, qzeros, scales = awq_quantize_ref(w, 128)
    return awq_dequantize_ref(qweight, qzeros, scales, 128, torch.float32).t()


def test_awq_checkpoint_matches_its_dequantized_model(base, tmp_path) -> None:
    got = _last_logits(_rewrite(base, str(tmp_path / "awq"), AWQ, _awq), PROMPT)
    want = _hf_logits(base, _awq_dequant)[-1]
    assert _rel(want, _hf_logits(base)[-1]) > 1e-2  # 4-bit rounding really changed the model
    assert _rel(got, want) < 1e-3


def test_fp8_checkpoint_and_online_fp8_agree_and_stay_close(base, tmp_path) -> None:
    ref = _hf_logits(base)[-1]
    weight_only = _rel(_hf_logits(base, _fp8_dequant)[-1], ref)
    ckpt = _last_logits(_rewrite(base, str(tmp_path / "fp8"), FP8_DYNAMIC, _fp8), PROMPT)
    online = _last_logits(base, PROMPT, quantization="fp8")
    assert _rel(online, ckpt) < 1e-5
    assert 1e-3 < weight_only and _rel(ckpt, ref) < 1.6 * weight_only, (_rel(ckpt, ref), weight_only)


def test_fp8_checkpoint_missing_scale_is_an_error(base, tmp_path) -> None:
    def no_scale(prefix: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": quantize_weight_fp8_ref(w)[0]}
    path = _rewrite(base, str(tmp_path / "noscale"), FP8_DYNAMIC, no_scale)
    with pytest.raises(ValueError, match="lacks weights"):
        LLM(path)


def test_fp8_moe_checkpoint_equals_online_fp8(tmp_path) -> None:
    """Per-expert FP8 weights and scales stream into the stacked expert tensors: the same quantization made
    online from the 16-bit experts gives the same logits."""
    moe = make_random_checkpoint(tiny_config("qwen3_moe", hidden_size=128, num_attention_heads=4, head_dim=32),
                                 str(tmp_path / "moe"), dtype="float32", seed=4)
    fp8_ignoring_router = fp8_dynamic_quant_config(["lm_head", "re:.*mlp.gate$"])
    ckpt = _last_logits(_rewrite(moe, str(tmp_path / "moe-fp8"), fp8_ignoring_router, _fp8), PROMPT)
    online = _last_logits(moe, PROMPT, quantization="fp8")
    full = _last_logits(moe, PROMPT)
    assert _rel(online, ckpt) < 1e-5
    assert _rel(ckpt, full) > 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_awq_checkpoint_in_fp16_on_the_gpu_tracks_its_dequantized_model(base, tmp_path, monkeypatch) -> None:
    """fp16 on CUDA with graphs: the prefill (the dequantizing GEMM) and every batch-1 decode step (the packed-fp16
    GEMV) give logits within 2e-2 of transformers' fp32 run of the dequantized weights on the same tokens."""
    from swiftlm.kernels import awq
    gemv_calls = []
    gemv = awq.awq_gemv_triton
    monkeypatch.setattr(awq, "awq_gemv_triton", lambda *a, **k: gemv_calls.append(1) or gemv(*a, **k))
    seen, tokens = _step_logits(_rewrite(base, str(tmp_path / "awq"), AWQ, _awq), PROMPT, steps=8, device="cuda",
                                dtype="float16")
    assert gemv_calls and len(seen) == 8
    want = _hf_logits(base, _awq_dequant, PROMPT + tokens[:-1])[len(PROMPT) - 1:]
    for step, got in enumerate(seen):
        assert _rel(got, want[step]) < 2e-2, step
