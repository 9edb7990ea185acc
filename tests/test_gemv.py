"""Decode GEMV (swiftlm.kernels.gemv): both Triton kernels vs gemv_ref, the split-K fix-up, configs, input checks.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set before triton is imported), so shapes stay small and
configs are forced to small tiles so that cases cover several column tiles, ragged N and K, and K splits. The
interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest), so exactness is checked on fp32 outputs and
16-bit outputs are checked to within one unit in the last place.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from swiftlm.kernels import gemv as gk  # noqa: E402
from swiftlm.kernels import triton_support  # noqa: E402
from swiftlm.kernels.gemv import GemvConfig  # noqa: E402
from swiftlm.kernels.quant import FP8_DTYPE, quantize_weight_fp8_ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (gk.HAS_TRITON and (CUDA or gk.TRITON_INTERPRETED)),
                                reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before import")

FMA = GemvConfig("fma", block_n=16, block_k=64, split_k=1, num_warps=4, num_stages=2)
DOT = GemvConfig("dot", block_n=16, block_k=64, split_k=1, num_warps=4, num_stages=2)
N, K = 40, 328  # 3 column tiles, the last ragged; 5 full K tiles and a ragged one


def operands(m: int, n: int, k: int, weight: str, seed: int = 0, act: torch.dtype = torch.bfloat16
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x [m, k], w [n, k] (16-bit, or e4m3 with per-row scales spanning 1000x), w_scale, bias."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(act)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    bias = torch.randn(n, generator=gen).to(act)
    if weight == "fp8":
        wq, scale = quantize_weight_fp8_ref(w * torch.logspace(-1.5, 1.5, n)[:, None])
        return x.to(DEVICE), wq.to(DEVICE), scale.to(DEVICE), bias.to(DEVICE)
    return x.to(DEVICE), w.to(act).to(DEVICE), None, bias.to(DEVICE)


def assert_exact(out: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32 outputs: only the summation order differs from the reference."""
    assert out.dtype == ref.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def assert_within_one_ulp(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    ulp = torch.finfo(out.dtype).eps * ref.float().abs().clamp(min=torch.finfo(out.dtype).tiny)
    assert torch.all((out.float() - ref.float()).abs() <= ulp * 1.01)


def test_reference_applies_one_scale_per_output_row() -> None:
    x, wq, scale, bias = operands(3, N, K, "fp8")
    expected = x.float() @ (wq.float() * scale.float()).t() + bias.float()
    torch.testing.assert_close(gk.gemv_ref(x, wq, scale, bias, torch.float32), expected, rtol=1e-6, atol=1e-5)
    assert gk.gemv_ref(x, wq, scale).dtype == torch.bfloat16


@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
@pytest.mark.parametrize("weight", ["bf16", "fp8"])
@pytest.mark.parametrize("m,split", [(1, 1), (2, 3), (3, 1), (5, 2), (8, 3)])
def test_kernels_match_reference(config: GemvConfig, weight: str, m: int, split: int) -> None:
    x, w, scale, bias = operands(m, N, K, weight, seed=m)
    cfg = GemvConfig(config.kernel, config.block_n, config.block_k, split, config.num_warps, config.num_stages)
    out = gk.gemv(x, w, scale, bias, out_dtype=torch.float32, config=cfg)
    assert_exact(out, gk.gemv_ref(x, w, scale, bias, torch.float32))


@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
def test_sixteen_rows_fp16_and_16bit_output(config: GemvConfig) -> None:
    x, w, scale, bias = operands(16, N, K, "fp8", act=torch.float16)
    out = gk.gemv(x, w, scale, bias, config=config)
    assert_within_one_ulp(out, gk.gemv_ref(x, w, scale, bias))
    x, w, _, _ = operands(16, N, K, "fp16", act=torch.float16)
    assert_exact(gk.gemv(x, w, out_dtype=torch.float32, config=config), gk.gemv_ref(x, w, out_dtype=torch.float32))


@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
def test_split_k_is_deterministic_and_leaves_counters_zeroed(config: GemvConfig) -> None:
    split = GemvConfig(config.kernel, config.block_n, config.block_k, 4, config.num_warps, config.num_stages)
    x, w, scale, bias = operands(4, N, 512, "fp8")
    first = gk.gemv(x, w, scale, bias, out_dtype=torch.float32, config=split)
    assert not any(buf.any() for buf in triton_support._COUNTERS[x.device])
    # The second launch finds the counters the first one reset; a different input proves it recomputes.
    x2 = -2 * x
    second = gk.gemv(x2, w, scale, bias, out_dtype=torch.float32, config=split)
    again = gk.gemv(x, w, scale, bias, out_dtype=torch.float32, config=split)
    assert torch.equal(first, again)
    assert_exact(second, gk.gemv_ref(x2, w, scale, bias, torch.float32))
    unsplit = gk.gemv(x, w, scale, bias, out_dtype=torch.float32, config=config)
    assert_exact(first, unsplit)


@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
def test_strided_rows_and_partial_last_tile(config: GemvConfig) -> None:
    wide, w, _, _ = operands(3, 37, 2 * K, "bf16")
    x = wide[:, :K]  # row stride 2K, e.g. a slice of a fused activation
    w = w[:, :K].contiguous()
    out = gk.gemv(x, w, out_dtype=torch.float32, config=config)
    assert out.shape == (3, 37)
    assert_exact(out, gk.gemv_ref(x, w, out_dtype=torch.float32))


def test_default_configs_and_table_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    n, k = 1024, 1024  # not in the tuned table
    assert gk.gemv_config(1, n, k, torch.bfloat16).kernel == "fma"
    assert gk.gemv_config(16, n, k, FP8_DTYPE).kernel == "dot"
    for m in (1, 2, 4, 8, 16):
        for dtype in (torch.bfloat16, FP8_DTYPE):
            cfg = gk.gemv_config(m, n, k, dtype)
            assert cfg.block_k * (1 if dtype == FP8_DTYPE else 2) in (256, 2048)  # bytes per weight row tile
    tuned = GemvConfig("dot", block_n=16, block_k=64, split_k=2, num_warps=4, num_stages=3)
    monkeypatch.setitem(gk.GEMV_CONFIGS, (N, K, 4, "fp8"), tuned)
    assert gk.gemv_config(3, N, K, FP8_DTYPE) == tuned  # M=3 falls in the M<=4 bucket
    assert gk.gemv_config(5, N, K, FP8_DTYPE) != tuned
    assert gk.gemv_config(3, N, K, torch.bfloat16) != tuned
    x, w, scale, bias = operands(3, N, K, "fp8")
    assert_exact(gk.gemv(x, w, scale, bias, out_dtype=torch.float32), gk.gemv_ref(x, w, scale, bias, torch.float32))


def test_auto_split_fills_the_gpu_but_keeps_k_tiles() -> None:
    sms = 132
    assert gk.auto_split_k(tiles=512, k=4096, block_k=1024, sms=sms) == 2  # 1024 programs, 2 tiles per split
    assert gk.auto_split_k(tiles=64, k=12288, block_k=128, sms=sms) == 16  # 64 * 16 >= 4 * 132
    assert gk.auto_split_k(tiles=19_000, k=4096, block_k=1024, sms=sms) == 1  # LM head: already thousands
    assert gk.auto_split_k(tiles=8, k=256, block_k=128, sms=sms) == 1  # too short to split


def test_zero_rows_and_bad_inputs() -> None:
    x, w, scale, _ = operands(2, N, K, "fp8")
    assert gk.gemv(x[:0], w, scale).shape == (0, N)
    with pytest.raises(ValueError, match="at most 16"):
        gk.gemv(torch.zeros(17, K, dtype=torch.bfloat16, device=DEVICE), w, scale)
    with pytest.raises(ValueError, match="w_scale"):
        gk.gemv(x, w)
    with pytest.raises(ValueError, match="one value per output row"):
        gk.gemv(x, w, scale[:-1])
    with pytest.raises(ValueError, match="must match"):
        gk.gemv(x.half(), w.float().to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"x \[M, K\]"):
        gk.gemv(x[:, :-1], w, scale)
    with pytest.raises(ValueError, match="invalid gemv config"):
        gk.gemv(x, w, scale, config=GemvConfig("fma", 24, 64, 1, 4, 1))
    with pytest.raises(ValueError, match=">= 16"):
        gk.gemv(x, w, scale, config=GemvConfig("dot", 8, 64, 1, 4, 1))


def test_tuned_table_is_valid_and_drives_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    for (n, k, bucket, kind), cfg in gk.GEMV_CONFIGS.items():
        gk._check_config(cfg)
        assert bucket in (1, 2, 4, 8, 16) and kind in ("bf16", "fp8") and n > 0 and k > 0
    assert gk.has_tuned_config(1, 4096, 12288, torch.bfloat16)  # Qwen3-8B down_proj at batch 1
    assert not gk.has_tuned_config(17, 4096, 12288, torch.bfloat16)
    assert not gk.has_tuned_config(1, 4096, 12289, torch.bfloat16)
    monkeypatch.setitem(gk.GEMV_CONFIGS, (N, K, 4, "bf16"), FMA)
    assert gk.has_tuned_config(3, N, K, torch.bfloat16) and not gk.has_tuned_config(3, N, K, FP8_DTYPE)
    x, w, _, _ = operands(3, N, K, "bf16")
    assert gk.use_gemv(x, w) == CUDA  # CPU tensors always take the library path
    assert not gk.use_gemv(x[None], w)


def test_fused_modes_dispatch_only_where_listed_and_pick_their_own_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    for (n, k, bucket, kind, mode), cfg in gk.FUSED_GEMV_CONFIGS.items():
        gk._check_config(cfg)
        assert (n, k, bucket, kind) in gk.GEMV_CONFIGS and mode in ("norm", "silu")
        assert mode != "norm" or cfg.split_k == 1  # the norm needs whole rows per program
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # dispatch only reads shapes here
    monkeypatch.setitem(gk.GEMV_CONFIGS, (N, K, 2, "bf16"), FMA)
    monkeypatch.setitem(gk.FUSED_GEMV_CONFIGS, (N, K, 2, "bf16", "norm"), DOT)
    x, w, _, _ = operands(2, N, K, "bf16")
    assert gk.use_gemv(x, w) and gk.use_gemv(x, w, "norm") and not gk.use_gemv(x, w, "silu")
    assert gk.gemv_config(2, N, K, torch.bfloat16, "norm") is DOT
    assert gk.gemv_config(2, N, K, torch.bfloat16, "silu") is FMA  # unlisted modes fall back to the plain tile


def test_out_buffer_with_strided_rows() -> None:
    x, w, _, bias = operands(3, N, K, "bf16")
    buf = torch.full((4, 2 * N), 7.0, device=DEVICE)
    out = buf[:3, :N]
    assert gk.gemv(x, w, bias=bias, out=out, config=FMA) is out
    assert_exact(out, gk.gemv_ref(x, w, bias=bias, out_dtype=torch.float32))
    assert torch.all(buf[:, N:] == 7.0) and torch.all(buf[3] == 7.0)
    with pytest.raises(ValueError, match="out must be"):
        gk.gemv(x, w, out_dtype=torch.bfloat16, out=torch.empty(3, N, device=DEVICE))
    with pytest.raises(ValueError, match="out must be"):
        gk.gemv(x, w, out_dtype=torch.float32, out=torch.empty(2, N, device=DEVICE))


def test_layers_route_decode_batches_through_the_gemv(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the dispatch rule forced on, bf16 and FP8 linear layers and the LM head give their library-path
    results (to bf16 rounding) through the GEMV, and the GEMV really runs."""
    from swiftlm.layers import embedding, linear
    from swiftlm.layers.quantization import fp8
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[1].dtype)
        return gk.gemv(*args, **kwargs)

    x, w, _, bias = operands(2, N, K, "bf16")
    layer = linear.ReplicatedLinear(K, N, bias=True, quant_method=None, dtype=torch.bfloat16).to(DEVICE)
    layer.weight.data.copy_(w)
    layer.bias.data.copy_(bias)
    q8 = linear.ReplicatedLinear(K, N, bias=False, quant_method=fp8.Fp8LinearMethod(checkpoint_fp8=False),
                                 dtype=torch.bfloat16).to(DEVICE)
    q8.weight.data.copy_(w)
    q8.quant_method.process_weights_after_loading(q8)
    head = embedding.LMHead(N, K, torch.bfloat16).to(DEVICE)
    head.weight.data.copy_(w)
    expected = (layer(x).float(), q8(x).float(), head(x))
    for module in (linear, fp8, embedding):
        monkeypatch.setattr(module, "use_gemv", lambda x, w, mode="plain": True)
        monkeypatch.setattr(module, "gemv", counted)
    got = (layer(x).float(), q8(x).float(), head(x))
    assert calls == [torch.bfloat16, FP8_DTYPE, torch.bfloat16]
    assert got[2].dtype == torch.float32
    ref8 = gk.gemv_ref(x, q8.weight, q8.weight_scale, out_dtype=torch.float32)
    torch.testing.assert_close(got[0], expected[0], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got[1], ref8, rtol=2e-2, atol=2e-2)  # W8A16: no activation quantization
    torch.testing.assert_close(got[2], expected[2], rtol=2e-2, atol=2e-2)
    buf = torch.zeros(2, N, device=DEVICE)
    assert head(x, out=buf) is buf and torch.equal(buf, got[2])


@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
@pytest.mark.parametrize("weight", ["bf16", "fp8"])
@pytest.mark.parametrize("m,split", [(1, 1), (3, 2)])
def test_silu_mul_input_matches_activation_then_gemv(config: GemvConfig, weight: str, m: int, split: int) -> None:
    """silu_mul=True on a merged [M, 2K] gate|up input equals the activation kernel's output fed to the GEMV."""
    from swiftlm.kernels.activation import silu_and_mul_ref

    gate_up, _, _, _ = operands(m, N, 2 * K, "bf16", seed=m + 7)
    _, w, scale, bias = operands(m, N, K, weight, seed=m)
    cfg = GemvConfig(config.kernel, config.block_n, config.block_k, split, config.num_warps, config.num_stages)
    out = gk.gemv(gate_up, w, scale, bias, out_dtype=torch.float32, config=cfg, silu_mul=True)
    act = silu_and_mul_ref(gate_up)
    if gk.TRITON_INTERPRETED:  # the interpreter's fp32 -> bf16 cast truncates instead of rounding to nearest
        gate, up = gate_up.float().chunk(2, dim=-1)
        exact = torch.nn.functional.silu(gate) * up
        act = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert_exact(out, gk.gemv_ref(act, w, scale, bias, torch.float32))
    with pytest.raises(ValueError, match="gate | up"):
        gk.gemv(act, w, scale, bias, silu_mul=True)


def test_mlp_down_projection_fuses_the_activation_only_on_the_gemv_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """A linear called with silu_mul=True equals linear(SiLU(gate) * up) on both dispatch branches, and the GEMV
    branch receives the merged input (no separate activation)."""
    from swiftlm.kernels.activation import silu_and_mul_ref
    from swiftlm.layers import linear

    gate_up, w, _, _ = operands(2, N, 2 * K, "bf16", seed=3)
    layer = linear.RowParallelLinear(K, N, False, None, torch.bfloat16).to(DEVICE)
    layer.weight.data.copy_(w[:, :K])
    want = layer(silu_and_mul_ref(gate_up)).float()
    torch.testing.assert_close(layer(gate_up, silu_mul=True).float(), want, rtol=2e-2, atol=2e-2)
    seen = []
    monkeypatch.setattr(linear, "use_gemv", lambda x, w, mode="plain": True)
    monkeypatch.setattr(linear, "gemv", lambda x, w, **kw: seen.append((x.shape, kw)) or gk.gemv(x, w, **kw))
    torch.testing.assert_close(layer(gate_up, silu_mul=True).float(), want, rtol=2e-2, atol=2e-2)
    assert seen == [((2, 2 * K), dict(w_scale=None, bias=None, silu_mul=True))]


def _bf16_cast(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 as the kernels' casts do (the interpreter truncates; GPUs round to nearest), back in fp32."""
    if gk.TRITON_INTERPRETED:
        return (t.contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32)
    return t.to(torch.bfloat16).float()


@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
@pytest.mark.parametrize("weight", ["bf16", "fp8"])
@pytest.mark.parametrize("m,with_residual", [(1, True), (3, True), (2, False)])
def test_rms_norm_input_matches_norm_then_gemv(config: GemvConfig, weight: str, m: int, with_residual: bool) -> None:
    """rms_weight folds a decoder layer's (add +) RMSNorm into the GEMV: the sums equal W (s * gamma) / rms(s) with
    s = x + residual, s lands in residual_out, and the result agrees with the unfused norm -> GEMV sequence."""
    from swiftlm.kernels.fused_norm import fused_add_rms_norm_ref, rms_norm_ref

    x, w, scale, bias = operands(m, N, K, weight, seed=11 + m)
    residual = operands(m, N, K, "bf16", seed=23 + m)[0] * 4 if with_residual else None
    gamma = (torch.rand(K, generator=torch.Generator().manual_seed(5)) + 0.5).to(torch.bfloat16).to(DEVICE)
    residual_out = torch.full_like(x, float("nan")) if with_residual else None
    split_cfg = GemvConfig(config.kernel, config.block_n, config.block_k, 2, config.num_warps, config.num_stages)
    out = gk.gemv(x, w, scale, bias, out_dtype=torch.float32, config=split_cfg, rms_weight=gamma, rms_eps=1e-6,
                  residual=residual, residual_out=residual_out)  # the norm overrides the config's K split
    s = x.float() + (residual.float() if with_residual else 0)
    inp = s * gamma.float()
    if config.kernel == "dot":  # tensor-core operands are 16-bit: s * gamma is rounded to x's dtype
        inp = _bf16_cast(inp)
    inv_rms = torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
    w_full = w.float() * (scale.float() if scale is not None else 1)
    assert_exact(out, inp @ w_full.t() * inv_rms + bias.float())
    if with_residual:
        assert_within_one_ulp(residual_out, s.to(torch.bfloat16))
        normed, _ = fused_add_rms_norm_ref(x, residual, gamma, 1e-6)
    else:
        normed = rms_norm_ref(x, gamma, 1e-6)
    unfused = gk.gemv_ref(normed, w, scale, bias, torch.float32)
    torch.testing.assert_close(out, unfused, rtol=2e-2, atol=2e-2 * unfused.abs().max().item())


def test_rms_norm_input_bad_arguments() -> None:
    x, w, _, _ = operands(2, N, K, "bf16")
    gamma = torch.ones(K, dtype=torch.bfloat16, device=DEVICE)
    r = torch.zeros_like(x)
    with pytest.raises(ValueError, match="residual_out"):
        gk.gemv(x, w, rms_weight=gamma, residual=r)
    with pytest.raises(ValueError, match="alias"):
        gk.gemv(x, w, rms_weight=gamma, residual=r, residual_out=r)
    with pytest.raises(ValueError, match="rms_weight must be"):
        gk.gemv(x, w, rms_weight=gamma[:-1])
    with pytest.raises(ValueError, match="not both"):
        gk.gemv(torch.cat([x, x], dim=1), w, rms_weight=gamma, silu_mul=True)


@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_pre_norm_projection_folds_the_norm_only_on_the_gemv_path(monkeypatch: pytest.MonkeyPatch, quant: str) -> None:
    """forward_pre_norm equals norm-then-linear on both dispatch branches (first layer without a residual, later
    layers with one), and the GEMV branch gets the raw input and the norm in one call."""
    from swiftlm.layers import linear
    from swiftlm.layers.norm import RMSNorm
    from swiftlm.layers.quantization import fp8
    from swiftlm.layers.quantization.fp8 import Fp8LinearMethod

    x, w, _, _ = operands(2, N, K, "bf16", seed=9)
    residual = operands(2, N, K, "bf16", seed=10)[0]
    layer = linear.QKVParallelLinear(K, 8, 3, 1, True, Fp8LinearMethod(False) if quant == "fp8" else None,
                                     torch.bfloat16).to(DEVICE)
    layer.weight.data.copy_(w)
    layer.bias.data.normal_()
    layer.quant_method.process_weights_after_loading(layer)
    norm = RMSNorm(K, 1e-6, torch.bfloat16).to(DEVICE)
    norm.weight.data.uniform_(0.5, 1.5)
    want = [(layer(norm(x)).float(), x), (layer(norm(x, residual)[0]).float(), norm(x, residual)[1])]
    seen = []
    for patched in (False, True):
        if patched:
            for module in (linear, fp8):
                monkeypatch.setattr(module, "use_gemv", lambda x, w, mode="plain": True)
            monkeypatch.setattr(linear, "gemv", lambda x, w, *a, **kw: seen.append(kw) or gk.gemv(x, w, *a, **kw))
        for (y_want, r_want), r_in in zip(want, (None, residual)):
            y, r = layer.forward_pre_norm(x, r_in, norm)
            torch.testing.assert_close(y.float(), y_want, rtol=3e-2, atol=3e-2 * y_want.abs().max().item())
            if r_in is None:
                assert r is x
            else:
                assert_within_one_ulp(r, r_want)
    assert [kw["rms_weight"] is norm.weight for kw in seen] == [True, True]
    assert seen[0]["residual"] is None and seen[1]["residual"] is residual
