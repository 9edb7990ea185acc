"""FP8 PTPC and AWQ W4A16: formats, Triton kernels vs their PyTorch references, and the linear methods.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set before triton is imported), so shapes stay
small. With CUDA the kernel tests run compiled on the GPU; the layer/loader tests build layers on the CPU.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from swiftlm.kernels import awq, quant  # noqa: E402
from swiftlm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear  # noqa: E402
from swiftlm.layers.quantization import AWQLinearMethod, Fp8LinearMethod, get_linear_method  # noqa: E402
from swiftlm.testing import fp8_dynamic_quant_config  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not (quant.HAS_TRITON and (CUDA or quant.TRITON_INTERPRETED)),
                                   reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before import")
FP8 = torch.float8_e4m3fn


def _all_fp8_values() -> torch.Tensor:
    """Every finite e4m3 value, as fp32."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(FP8).float()
    return values[torch.isfinite(values)]


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=tol * b.float().abs().max().item(), rtol=tol)


# ---------------------------------------------------------------------------------------------------------
# FP8 formats
# ---------------------------------------------------------------------------------------------------------

def test_per_token_quant_ref_follows_the_ptpc_definition() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 96) * torch.logspace(-3, 3, 6)[:, None]
    x[2] = 0.0
    q, scale = quant.per_token_quant_fp8_ref(x)
    assert q.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == (6, 1)
    expected = (x.abs().amax(-1, keepdim=True) / 448.0).clamp(min=quant.FP8_MIN_SCALE)
    torch.testing.assert_close(scale, expected, rtol=0, atol=0)
    nonzero = torch.arange(6) != 2
    # The row maximum maps to the largest e4m3 value; the all-zero row quantizes to zeros.
    assert torch.all(q.float()[nonzero].abs().amax(-1) == 448.0)
    assert torch.all(q.float()[2] == 0)
    # Round to nearest with 3 mantissa bits: |q * s - x| <= 2^-4 |x| in the normal range (>= 2^-6 * s),
    # and half the subnormal step (2^-10 * s) below it.
    err = (q.float() * scale - x).abs()
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-6)
    assert torch.all(err <= bound)


def test_weight_scales_are_per_output_channel() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 64) * torch.arange(1, 9)[:, None].float()
    wq, ws = quant.quantize_weight_fp8_ref(w)
    assert ws.shape == (8, 1)
    torch.testing.assert_close(ws[:, 0], w.abs().amax(dim=1) / 448.0, rtol=0, atol=0)
    # Dequantizing row n uses scale n only: scaling one row changes only its scale, not its codes.
    w2 = w.clone()
    w2[3] *= 4.0
    wq2, ws2 = quant.quantize_weight_fp8_ref(w2)
    assert torch.equal(wq2.view(torch.uint8), wq.view(torch.uint8))
    torch.testing.assert_close(ws2[3], ws[3] * 4.0)
    assert torch.equal(ws2[torch.arange(8) != 3], ws[torch.arange(8) != 3])


def test_kv_fp8_quantize_clamps_and_round_trips() -> None:
    grid = _all_fp8_values()
    scale = 0.25
    # Values on the (scaled) e4m3 grid survive the round trip exactly.
    exact = quant.dequantize_kv_fp8(quant.quantize_kv_fp8(grid * scale, scale), scale, torch.float32)
    torch.testing.assert_close(exact, grid * scale, rtol=0, atol=0)
    # Out-of-range values saturate at +-448 * scale instead of becoming NaN.
    big = torch.tensor([1e6, -1e6, 448 * scale * 1.01])
    assert quant.quantize_kv_fp8(big, scale).float().tolist() == [448.0, -448.0, 448.0]


@needs_kernels
def test_triton_fp8_cast_rounds_to_nearest_even_everywhere() -> None:
    """Every fp8 value, every midpoint (ties) and a dense sweep, through the kernels' fp32 -> e4m3 cast."""
    grid = _all_fp8_values().sort().values
    mids = (grid[1:] + grid[:-1]) / 2
    sweep = torch.linspace(-448, 448, 20001)
    tiny = torch.linspace(-0.02, 0.02, 4001)
    values = torch.cat([grid, mids, sweep, tiny]).to(DEVICE)
    # A row whose amax is exactly 448 has scale 1, so the kernel's cast sees the values themselves.
    rows = torch.cat([values, torch.full(((-values.numel()) % 512,), 448.0, device=DEVICE)]).view(-1, 512)
    rows[:, 0] = 448.0
    q, scale = quant.per_token_quant_fp8(rows)
    assert torch.all(scale == 1.0)
    assert torch.equal(q.view(torch.uint8), rows.to(FP8).view(torch.uint8))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [200, 9000])  # one register-resident pass / two passes over a long row
def test_per_token_quant_kernel_matches_ref(dtype: torch.dtype, k: int) -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 3, k) * 3).to(dtype).to(DEVICE)
    x[0, 1] = 0
    q, scale = quant.per_token_quant_fp8(x)
    q_ref, scale_ref = quant.per_token_quant_fp8_ref(x)
    assert q.shape == (2, 3, k) and scale.shape == (2, 3, 1)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
    # GPU fp32 division may differ from IEEE by an ulp, moving a value across a rounding boundary.
    mismatched = (q.float() != q_ref.float()).float().mean().item()
    assert mismatched <= (0 if quant.TRITON_INTERPRETED else 1e-3)
    # Such a value is one e4m3 step away (3 mantissa bits: at most 1/8 of it); nothing moves further.
    torch.testing.assert_close(q.float() * scale, q_ref.float() * scale_ref, rtol=0.13, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# FP8 GEMM
# ---------------------------------------------------------------------------------------------------------

def _close_fp8_gemm(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """`_close` for FP8 GEMM kernels: Hopper's FP8 tensor cores accumulate with fewer bits than fp32 (errors
    ~3e-4 of the output's range measured on an H100), so fp32 outputs get 2e-3 on CUDA; the interpreter is
    exact and keeps 1e-4."""
    if dtype == torch.float32 and CUDA:
        torch.testing.assert_close(out, ref, atol=2e-3 * ref.abs().max().item(), rtol=2e-3)
    else:
        _close(out, ref, dtype)


def _fp8_operands(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    a, a_scale = quant.per_token_quant_fp8_ref(torch.randn(m, k, device=DEVICE))
    w, w_scale = quant.quantize_weight_fp8_ref(torch.randn(n, k, device=DEVICE) * 0.05)
    bias = torch.randn(n, device=DEVICE)
    return a, a_scale, w, w_scale, bias


def test_fp8_gemm_ref_is_the_dequantized_product() -> None:
    a, a_scale, w, w_scale, bias = _fp8_operands(3, 16, 32)
    expected = (a.float() * a_scale) @ (w.float() * w_scale).t() + bias
    torch.testing.assert_close(quant.fp8_gemm_ref(a, a_scale, w, w_scale, bias, torch.float32), expected)


@needs_kernels
@pytest.mark.parametrize("m,split_k", [(1, 1), (5, 2), (16, None), (33, 3)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_small_m_kernel_matches_ref(m: int, split_k: int | None, out_dtype: torch.dtype) -> None:
    a, a_scale, w, w_scale, bias = _fp8_operands(m, 80, 640)
    ref = quant.fp8_gemm_ref(a, a_scale, w, w_scale, bias, out_dtype)
    out = quant.fp8_gemm_triton_small_m(a, a_scale, w, w_scale, bias, out_dtype, split_k=split_k,
                                        config={"BLOCK_N": 32, "BLOCK_K": 128})
    assert out.dtype == out_dtype
    _close_fp8_gemm(out, ref, out_dtype)


@needs_kernels
@pytest.mark.parametrize("m,k", [(7, 256), (70, 200), (300, 384)])  # 200: K tail masked; 300: 128-row tiles
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_large_m_kernel_matches_ref(m: int, k: int, out_dtype: torch.dtype) -> None:
    a, a_scale, w, w_scale, bias = _fp8_operands(m, 72, k)
    ref = quant.fp8_gemm_ref(a, a_scale, w, w_scale, bias, out_dtype)
    cfg = {"BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 2} if m > 256 else None
    _close_fp8_gemm(quant.fp8_gemm_triton(a, a_scale, w, w_scale, bias, out_dtype, config=cfg), ref, out_dtype)
    _close_fp8_gemm(quant.fp8_gemm_triton(a, a_scale, w, w_scale, None, out_dtype, config=cfg),
                    quant.fp8_gemm_ref(a, a_scale, w, w_scale, None, out_dtype), out_dtype)


def test_fp8_scaled_mm_path_matches_ref() -> None:
    if CUDA and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("row-wise _scaled_mm needs sm89+")
    a, a_scale, w, w_scale, bias = _fp8_operands(5, 48, 64)
    ref = quant.fp8_gemm_ref(a, a_scale, w, w_scale, bias, torch.bfloat16)
    _close(quant.fp8_gemm(a, a_scale, w, w_scale, bias, torch.bfloat16, backend="scaled_mm"), ref, torch.bfloat16)


def test_fp8_dispatch_follows_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(quant.FP8_GEMM_DISPATCH, "triton_small_m_max", 8)
    monkeypatch.setitem(quant.FP8_GEMM_DISPATCH, "triton_large_m_max", 64)
    w = torch.empty(32, 64, dtype=FP8, device=DEVICE)

    def pick(m: int, out_dtype: torch.dtype = torch.bfloat16) -> str:
        return quant.select_fp8_backend(torch.empty(m, 64, dtype=FP8, device=DEVICE), w, out_dtype)

    if quant.can_use_triton(w):
        # Row-wise _scaled_mm runs on sm89+ CUDA only; on CPU (interpreter) large batches stay on Triton.
        big = "scaled_mm" if CUDA and torch.cuda.get_device_capability() >= (8, 9) else "triton_large"
        assert [pick(m) for m in (1, 8, 9, 64, 65)] == ["triton_small"] * 2 + ["triton_large"] * 2 + [big]
        assert pick(4096, torch.float16) == "triton_large"  # row-wise _scaled_mm only writes bf16
    else:
        assert pick(1) == "torch" and pick(1, torch.float32) == "torch"
    with pytest.raises(ValueError, match="unknown fp8 gemm backend"):
        quant.fp8_gemm(torch.empty(1, 64, dtype=FP8), torch.ones(1, 1), w.cpu(), torch.ones(32, 1), backend="cutlass")


@needs_kernels
def test_fp8_linear_accepts_prequantized_input() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, device=DEVICE, dtype=torch.bfloat16)
    w, w_scale = quant.quantize_weight_fp8_ref(torch.randn(64, 128, device=DEVICE) * 0.05)
    y = quant.fp8_linear(x, w, w_scale)
    xq, xs = quant.per_token_quant_fp8(x)
    y_pre = quant.fp8_linear(xq, w, w_scale, x_scale=xs)
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_pre, rtol=0, atol=0)
    with pytest.raises(ValueError, match="x_scale"):
        quant.fp8_linear(xq, w, w_scale)


# ---------------------------------------------------------------------------------------------------------
# AWQ format
# ---------------------------------------------------------------------------------------------------------

def test_awq_pack_matches_autoawq_interleave_bit_for_bit() -> None:
    # Column c of a pack sits in nibble AWQ_REVERSE_ORDER[c]: columns 0..7 -> nibbles 0,4,1,5,2,6,3,7.
    values = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 15, 0, 0, 0, 0, 0, 0, 0],
                           [0, 15, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15]])
    packed = awq.awq_pack(values)
    assert packed.dtype == torch.int32 and packed.shape == (2, 2)
    words = [[w & 0xFFFFFFFF for w in row] for row in packed.tolist()]
    assert words == [[0x75316420, 0x0000000F], [0x000F0000, 0xF0000000]]
    assert torch.equal(awq.awq_unpack(packed), values.to(torch.int32))
    torch.manual_seed(0)
    rand = torch.randint(0, 16, (5, 64))
    assert torch.equal(awq.awq_unpack(awq.awq_pack(rand)), rand.to(torch.int32))


def test_awq_dequantize_ref_is_q_minus_z_times_s() -> None:
    torch.manual_seed(0)
    k, n, group = 64, 16, 32
    q = torch.randint(0, 16, (k, n))
    z = torch.randint(0, 16, (k // group, n))
    s = (torch.rand(k // group, n) + 0.5).half()
    w = awq.awq_dequantize_ref(awq.awq_pack(q), awq.awq_pack(z), s, group, torch.float32)
    for row, col in [(0, 0), (31, 5), (32, 5), (63, 15)]:
        assert w[row, col].item() == (q[row, col] - z[row // group, col]).item() * s[row // group, col].float().item()


def test_awq_quantize_ref_round_trip_error_is_half_a_step() -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 256)
    qweight, qzeros, scales = awq.awq_quantize_ref(w, 128)
    assert qweight.shape == (256, 3) and qzeros.shape == (2, 3) and scales.shape == (2, 24)
    assert scales.dtype == torch.float16
    back = awq.awq_dequantize_ref(qweight, qzeros, scales, 128, torch.float32).t()
    step = scales.float().repeat_interleave(128, dim=0).t()
    # Round to nearest on a 16-level grid spanning [min, max] (zero point rounded too): error <= one step.
    assert torch.all((back - w).abs() <= step * 1.001)
    assert ((back - w).abs() / step).mean() < 0.3


def _awq_operands(m: int, k: int, n: int, group: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    qweight, qzeros, scales = awq.awq_quantize_ref(torch.randn(n, k) * 0.05, group)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    return tuple(t.to(DEVICE) for t in (x, qweight, qzeros, scales, bias))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_awq_dequantize_kernel_matches_ref(dtype: torch.dtype) -> None:
    _, qweight, qzeros, scales, _ = _awq_operands(1, 256, 160, 64, dtype)
    out = awq.awq_dequantize(qweight, qzeros, scales, 64, dtype)
    ref = awq.awq_dequantize_ref(qweight, qzeros, scales, 64, dtype)
    if dtype == torch.bfloat16 and awq.TRITON_INTERPRETED:  # the interpreter truncates fp32 -> bf16
        _close(out, ref, dtype)
    else:
        assert torch.equal(out, ref)


@needs_kernels
@pytest.mark.parametrize("m,split_k", [(1, None), (3, 2), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_awq_gemv_kernel_matches_ref(m: int, split_k: int | None, dtype: torch.dtype) -> None:
    x, qweight, qzeros, scales, bias = _awq_operands(m, 256, 96, 128, dtype)
    out = awq.awq_gemv_triton(x, qweight, qzeros, scales, 128, bias, split_k=split_k)
    _close(out, awq.awq_gemm_ref(x, qweight, qzeros, scales, 128, bias), dtype)


@needs_kernels
@pytest.mark.parametrize("m,flush", [(1, 1), (5, 2), (2, 4)])
def test_awq_gemv_flush_blocks_and_uneven_splits(m: int, flush: int) -> None:
    """16 groups in 3 K splits (6, 6, 4 groups): fp16 partial sums reduced every `flush` groups, with a partial
    last flush block in every split; extreme codes and zero points (0 and 15) and large activations."""
    x, qweight, qzeros, scales, bias = _awq_operands(m, 1024, 48, 64, torch.float16, seed=3)
    x[:, ::7] = 60.0
    qweight[::5] = -1  # every nibble 15
    qzeros[1::3] = 0
    cfg = {"BLOCK_P": 2, "BLOCK_K": 32, "FLUSH": flush}
    out = awq.awq_gemv_triton(x, qweight, qzeros, scales, 64, bias, split_k=3, config=cfg)
    _close(out, awq.awq_gemm_ref(x, qweight, qzeros, scales, 64, bias), torch.float16)


def test_awq_gemv_rejects_fp32_which_dispatches_to_the_gemm() -> None:
    x, qweight, qzeros, scales, _ = _awq_operands(1, 256, 16, 128, torch.float32)
    with pytest.raises(ValueError, match="packed fp16"):
        awq.awq_gemv_triton(x, qweight, qzeros, scales, 128)
    if quant.can_use_triton(x):
        assert awq.select_awq_backend(x) == "gemm"


@needs_kernels
@pytest.mark.parametrize("m,split_k", [(5, 2), (20, None), (70, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_awq_gemm_kernel_matches_ref(m: int, split_k: int | None, dtype: torch.dtype) -> None:
    x, qweight, qzeros, scales, bias = _awq_operands(m, 256, 80, 64, dtype)
    out = awq.awq_gemm_triton(x, qweight, qzeros, scales, 64, bias, split_k=split_k)
    _close(out, awq.awq_gemm_ref(x, qweight, qzeros, scales, 64, bias), dtype)
    _close(awq.awq_gemm(x, qweight, qzeros, scales, 64, bias, backend="dequant_mm"),
           awq.awq_gemm_ref(x, qweight, qzeros, scales, 64, bias), dtype)


def test_awq_dispatch_follows_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(awq.AWQ_DISPATCH, "gemv_max_m", 4)
    monkeypatch.setitem(awq.AWQ_DISPATCH, "dequant_mm_min_m", 256)
    picks = [awq.select_awq_backend(torch.empty(m, 128, dtype=torch.float16, device=DEVICE))
             for m in (1, 4, 5, 255, 256)]
    if quant.can_use_triton(torch.empty(1, device=DEVICE)):
        assert picks == ["gemv", "gemv", "gemm", "gemm", "dequant_mm"]
    else:
        assert picks == ["torch"] * 5


# ---------------------------------------------------------------------------------------------------------
# Linear methods and loaders
# ---------------------------------------------------------------------------------------------------------

def test_fp8_checkpoint_qkv_loader_places_rows_and_scales() -> None:
    torch.manual_seed(0)
    hidden, d, hq, hkv = 128, 16, 4, 2
    layer = QKVParallelLinear(hidden, d, hq, hkv, True, Fp8LinearMethod(checkpoint_fp8=True), torch.bfloat16)
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == ((hq + 2 * hkv) * d, 1)
    shards = {}
    for name, rows in (("q", hq * d), ("k", hkv * d), ("v", hkv * d)):
        w, s = quant.quantize_weight_fp8_ref(torch.randn(rows, hidden) * 0.05)
        shards[name] = (w, s.to(torch.bfloat16), torch.randn(rows).to(torch.bfloat16))  # checkpoints store bf16 scales
        layer.weight_loader(layer.weight, w, name)
        layer.weight_loader(layer.weight_scale, s.to(torch.bfloat16), name)
        layer.weight_loader(layer.bias, shards[name][2], name)
    layer.quant_method.process_weights_after_loading(layer)
    full_w = torch.cat([shards[n][0] for n in "qkv"])
    assert torch.equal(layer.weight.view(torch.uint8), full_w.view(torch.uint8))
    torch.testing.assert_close(layer.weight_scale, torch.cat([shards[n][1] for n in "qkv"]).float(), rtol=0, atol=0)
    x = torch.randn(3, hidden).to(torch.bfloat16)
    xq, xs = quant.per_token_quant_fp8_ref(x)
    ref = quant.fp8_gemm_ref(xq, xs, full_w, layer.weight_scale, layer.bias, torch.bfloat16)
    _close(layer(x), ref, torch.bfloat16)


def test_online_fp8_merged_layer_quantizes_within_e4m3_error() -> None:
    """Relative Frobenius error of the output vs bf16 must lie in (0.02, 0.05).

    e4m3 keeps 3 mantissa bits, so rounding to nearest leaves each value a relative error of at most 2^-4; for
    values spread over a binade its RMS is about 2^-3 / sqrt(12) / 1.44 ~ 0.025. Weights and activations are
    both quantized and their errors are independent, so the output error concentrates near sqrt(2) * 0.025
    ~ 0.036 (0.0376 measured on this data). 0.05 leaves room for sampling noise while catching a lost bit
    (~0.07) or a misplaced scale (O(1)); the lower bound proves quantization actually happened.
    """
    torch.manual_seed(0)
    hidden, inter = 256, 96
    layer = MergedColumnParallelLinear(hidden, [inter, inter], False, Fp8LinearMethod(checkpoint_fp8=False),
                                       torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16
    gate, up = ((torch.randn(inter, hidden) * 0.02).to(torch.bfloat16) for _ in range(2))
    layer.weight_loader(layer.weight, gate, 0)
    layer.weight_loader(layer.weight, up, 1)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (2 * inter, 1)
    full = torch.cat([gate, up]).float()
    torch.testing.assert_close(layer.weight_scale[:, 0], full.abs().amax(dim=1) / 448.0, rtol=1e-6, atol=0)
    x = torch.randn(32, hidden).to(torch.bfloat16)
    out = layer(x).float()
    ref = x.float() @ full.t()
    err = ((out - ref).norm() / ref.norm()).item()
    assert 0.02 < err < 0.05


def test_fp8_prefill_gets_activations_quantized_by_the_norm_and_the_activation(monkeypatch) -> None:
    """Batches past the GEMV sizes: the pre-norm projection takes e4m3 rows and scales from the fused add + RMSNorm
    + quant kernel, the down projection from the fused SiLU-and-mul + quant kernel; nothing quantizes a 16-bit
    activation row afterwards (per_token_quant_fp8 would be that extra pass)."""
    from swiftlm.kernels.activation import silu_and_mul_fp8_ref
    from swiftlm.kernels.fused_norm import fused_add_rms_norm_fp8_ref
    from swiftlm.layers.norm import RMSNorm

    torch.manual_seed(0)
    hidden, inter, rows = 128, 64, 24
    up = MergedColumnParallelLinear(hidden, [inter, inter], False, Fp8LinearMethod(checkpoint_fp8=False),
                                    torch.bfloat16)
    down = RowParallelLinear(inter, hidden, False, Fp8LinearMethod(checkpoint_fp8=False), torch.bfloat16)
    for layer in (up, down):
        layer.weight.data.normal_(0, 0.05)
        layer.quant_method.process_weights_after_loading(layer)
    norm = RMSNorm(hidden, 1e-6, torch.bfloat16)
    norm.weight.data.uniform_(0.5, 1.5)
    x, residual = (torch.randn(rows, hidden).to(torch.bfloat16) for _ in range(2))
    monkeypatch.setattr(quant, "per_token_quant_fp8", lambda *a: pytest.fail("a separate quantization pass ran"))

    gate_up, new_residual = up.forward_pre_norm(x, residual, norm)
    q, scale, want_residual = fused_add_rms_norm_fp8_ref(x, residual, norm.weight, norm.eps)
    _close(gate_up, quant.fp8_gemm_ref(q, scale, up.weight, up.weight_scale, None, torch.bfloat16), torch.bfloat16)
    torch.testing.assert_close(new_residual.float(), want_residual.float(), rtol=2 ** -7, atol=0)  # one bf16 ulp
    first, same = up.forward_pre_norm(x, None, norm)
    q, scale, _ = fused_add_rms_norm_fp8_ref(x, None, norm.weight, norm.eps)
    _close(first, quant.fp8_gemm_ref(q, scale, up.weight, up.weight_scale, None, torch.bfloat16), torch.bfloat16)
    assert same is x

    out = down(gate_up, silu_mul=True)
    q, scale = silu_and_mul_fp8_ref(gate_up)
    _close(out, quant.fp8_gemm_ref(q, scale, down.weight, down.weight_scale, None, torch.bfloat16), torch.bfloat16)


def test_fp8_layer_refuses_unquantized_use() -> None:
    layer = RowParallelLinear(64, 32, False, Fp8LinearMethod(checkpoint_fp8=False), torch.bfloat16)
    with pytest.raises(RuntimeError, match="process_weights_after_loading"):
        layer(torch.randn(1, 64).to(torch.bfloat16))


def test_awq_merged_loader_divides_offsets_by_pack_factor() -> None:
    hidden, group = 256, 128
    sizes = [64, 32]
    layer = MergedColumnParallelLinear(hidden, sizes, False, AWQLinearMethod(group), torch.float16)
    assert layer.qweight.shape == (hidden, 12) and layer.qzeros.shape == (2, 12) and layer.scales.shape == (2, 96)
    shards = [awq.awq_quantize_ref(torch.randn(n, hidden) * 0.05, group) for n in sizes]
    for shard_id, (qweight, qzeros, scales) in enumerate(shards):
        layer.weight_loader(layer.qweight, qweight, shard_id)
        layer.weight_loader(layer.qzeros, qzeros, shard_id)
        layer.weight_loader(layer.scales, scales, shard_id)
    for i, name in enumerate(("qweight", "qzeros", "scales")):
        assert torch.equal(getattr(layer, name), torch.cat([s[i] for s in shards], dim=1))
    x = torch.randn(3, hidden).half()
    ref = awq.awq_gemm_ref(x, *(torch.cat([s[i] for s in shards], dim=1) for i in range(3)), group)
    _close(layer(x), ref, torch.float16)


def test_awq_qkv_loader_with_bias_and_row_parallel_input_split() -> None:
    hidden, d, hq, hkv, group = 128, 16, 4, 2, 64
    layer = QKVParallelLinear(hidden, d, hq, hkv, True, AWQLinearMethod(group), torch.float16)
    parts = {}
    for name, rows in (("q", hq * d), ("k", hkv * d), ("v", hkv * d)):
        parts[name] = awq.awq_quantize_ref(torch.randn(rows, hidden), group) + (torch.randn(rows).half(),)
        for param, tensor in zip((layer.qweight, layer.qzeros, layer.scales, layer.bias), parts[name]):
            layer.weight_loader(param, tensor, name)
    k_cols = slice(hq * d // 8, (hq + hkv) * d // 8)
    assert torch.equal(layer.qweight[:, k_cols], parts["k"][0])
    assert torch.equal(layer.scales[:, (hq + hkv) * d:], parts["v"][2])
    assert torch.equal(layer.bias[hq * d:(hq + hkv) * d], parts["k"][3])
    # Row-parallel rank 1 of 2 takes the second half of the input rows of every tensor (group rows for zeros).
    down = RowParallelLinear(512, 64, False, AWQLinearMethod(128), torch.float16, tp_rank=1, tp_size=2)
    qweight, qzeros, scales = awq.awq_quantize_ref(torch.randn(64, 512), 128)
    for param, tensor in zip((down.qweight, down.qzeros, down.scales), (qweight, qzeros, scales)):
        down.weight_loader(param, tensor)
    assert torch.equal(down.qweight, qweight[256:]) and torch.equal(down.qzeros, qzeros[2:])
    assert torch.equal(down.scales, scales[2:])


def test_awq_method_rejects_ungrouped_sizes() -> None:
    with pytest.raises(ValueError, match="group size"):
        RowParallelLinear(100, 64, False, AWQLinearMethod(128), torch.float16)


# ---------------------------------------------------------------------------------------------------------
# Config -> method
# ---------------------------------------------------------------------------------------------------------

_FP8_DYNAMIC = fp8_dynamic_quant_config(["lm_head", "re:.*mlp.gate$", "model.layers.1.self_attn.q_proj",
                                         "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
                                         "model.layers.2.mlp.up_proj"])


def test_compressed_tensors_fp8_config() -> None:
    quant_for = get_linear_method(None, _FP8_DYNAMIC)
    method = quant_for("model.layers.0.self_attn.qkv_proj")
    assert isinstance(method, Fp8LinearMethod) and method.checkpoint_fp8 and method.quant_name is None
    assert quant_for("model.layers.0.mlp.down_proj") is method
    assert quant_for("lm_head") is None and quant_for("model.layers.3.mlp.gate") is None
    assert quant_for("model.layers.1.self_attn.qkv_proj") is None  # every part ignored
    with pytest.raises(ValueError, match="only some"):
        quant_for("model.layers.2.mlp.gate_up_proj")
    restated = get_linear_method("fp8", _FP8_DYNAMIC)("model.layers.0.self_attn.o_proj")
    assert isinstance(restated, Fp8LinearMethod) and restated.checkpoint_fp8
    with pytest.raises(ValueError, match="does not match"):
        get_linear_method("awq", _FP8_DYNAMIC)
    static = {**_FP8_DYNAMIC, "config_groups": {"g": {**_FP8_DYNAMIC["config_groups"]["group_0"],
                                                       "weights": {"num_bits": 8, "type": "float",
                                                                   "strategy": "tensor"}}}}
    with pytest.raises(NotImplementedError, match="FP8-dynamic"):
        get_linear_method(None, static)


def test_awq_and_online_fp8_configs() -> None:
    cfg = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "GEMM",
           "modules_to_not_convert": ["visual"]}
    quant_for = get_linear_method("awq", cfg)
    method = quant_for("model.layers.0.mlp.gate_up_proj")
    assert isinstance(method, AWQLinearMethod) and method.group_size == 128
    assert quant_for("visual.blocks.0.attn.qkv_proj") is None
    with pytest.raises(NotImplementedError):
        get_linear_method(None, {**cfg, "version": "gemv"})
    online = get_linear_method("fp8", None)
    method = online("model.layers.0.self_attn.o_proj")
    assert isinstance(method, Fp8LinearMethod) and not method.checkpoint_fp8 and method.quant_name == "fp8"
    assert online("lm_head") is None and online("model.layers.0.mlp.gate") is None
    assert get_linear_method(None, None)("model.layers.0.self_attn.o_proj") is None
    with pytest.raises(ValueError, match="needs a checkpoint"):
        get_linear_method("awq", None)
    with pytest.raises(ValueError, match="unknown quantization"):
        get_linear_method("int3", None)
    with pytest.raises(NotImplementedError, match="not supported"):
        get_linear_method(None, {"quant_method": "gptq"})


@needs_kernels
def test_awq_gemv_split_k_is_deterministic_and_resets_counters() -> None:
    """K splits of whole groups, ragged last column tile: the in-kernel fix-up gives the same bits every call and
    leaves the shared split-K counters zeroed for the next launch (CUDA-graph replays rely on it)."""
    from swiftlm.kernels.triton_support import split_counters
    x, qweight, qzeros, scales, bias = _awq_operands(2, 512, 264, 64, torch.float16)
    cfg = {"BLOCK_P": 16, "BLOCK_K": 16}
    first = awq.awq_gemv_triton(x, qweight, qzeros, scales, 64, bias, split_k=4, config=cfg)
    again = awq.awq_gemv_triton(x, qweight, qzeros, scales, 64, bias, split_k=4, config=cfg)
    assert torch.equal(first, again)
    assert not split_counters(x.device, 3).any()
    _close(first, awq.awq_gemm_ref(x, qweight, qzeros, scales, 64, bias), torch.float16)
    with pytest.raises(ValueError, match="must divide the group size"):
        awq.awq_gemv_triton(x, qweight, qzeros, scales, 64, config={"BLOCK_K": 128})
