"""Integer kernels and code arithmetic against plain float arithmetic on the same integer codes."""

from __future__ import annotations

import pytest
import torch

from tacdiff.backends.codes import (activation_codes, centred_weight, max_centred_weight, pair_sums_fit_int16,
                                    unsigned_codes)
from tacdiff.backends import int_mm
from tacdiff.backends.int_mm import Int8Matmul
from tacdiff.backends.onednn import OneDNNConv2d, OneDNNLinear
from tacdiff.quant import primitives as P
from tacdiff.quant.layers import ActQuantizer, TimestepRouter

from int8_support import needs_exact_int8


def _reference(a_codes: torch.Tensor, a_zero: torch.Tensor, a_scale: torch.Tensor, w_codes: torch.Tensor,
               w_zero: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The dequantized product in float64 from unsigned codes: what the int8 GEMM must reproduce."""
    a = (a_codes.double() - a_zero.double()) * a_scale.double()
    w = (w_codes.double() - w_zero.double()) * w_scale.double()
    return a @ w + bias.double()


@pytest.mark.parametrize("w_bits", [4, pytest.param(8, marks=needs_exact_int8)])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("padded", [False, True], ids=["plain", "cuda-padded"])
def test_int8_matmul_equals_the_dequantized_product(w_bits: int, per_row: bool, padded: bool) -> None:
    """13 x 70 x 9: too few rows and no multiple of 8, so the CUDA layout (run here on the CPU) pads all three."""
    g = torch.Generator().manual_seed(0)
    m, k, n = 13, 70, 9
    w_codes = torch.randint(0, 2**w_bits, (k, n), generator=g)
    w_zero = torch.randint(0, 2**w_bits, (n,), generator=g).float()
    w_zero[0] = 0  # an 8-bit channel whose centred codes overflow int8: the rowsum term is needed
    w_scale = torch.rand(n, generator=g) + 0.1
    a_unsigned = torch.randint(0, 256, (m, k), generator=g)
    a_zero = torch.randint(0, 256, (m, 1) if per_row else (), generator=g).float()
    a_scale = torch.rand((m, 1) if per_row else (), generator=g) + 0.1
    bias = torch.randn(n, generator=g)
    matmul = Int8Matmul(w_codes, w_zero, w_scale, bias, padded=padded)
    assert matmul.weight.shape[0] % 8 == 0 if padded else matmul.weight.shape[0] == k
    out = matmul((a_unsigned - 128).to(torch.int8), a_scale, a_zero - 128)
    expected = _reference(a_unsigned, a_zero, a_scale, w_codes, w_zero, w_scale, bias)
    assert out.shape == (m, n)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-3)
    assert (matmul.residual_scaled is not None) == (w_bits == 8)
    if not per_row:  # a static range's epilogue, computed once ahead, gives the same bits
        ahead = matmul.epilogue(a_scale, a_zero - 128)
        assert torch.equal(matmul((a_unsigned - 128).to(torch.int8), a_scale, a_zero - 128, ahead), out)


def test_a_shape_cublas_refuses_is_multiplied_exactly_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (40, 64), generator=g, dtype=torch.int8)
    weight = torch.randint(-128, 128, (64, 24), generator=g, dtype=torch.int8)
    expected = (a.long() @ weight.long()).int()
    calls = []

    def refuse(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args)
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")

    monkeypatch.setattr(torch, "_int_mm", refuse)
    monkeypatch.setattr(int_mm, "_REFUSED", set())
    assert torch.equal(int_mm.padded_int_mm(a, weight), expected)
    assert torch.equal(int_mm.padded_int_mm(a, weight), expected)
    assert len(calls) == 1  # the refusal is remembered for the shape


def test_other_int_mm_errors_are_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch, "_int_mm", fail)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        int_mm.padded_int_mm(torch.zeros(32, 16, dtype=torch.int8), torch.zeros(16, 8, dtype=torch.int8))


def test_centred_weight_is_exact_and_centres_where_it_fits() -> None:
    codes = torch.tensor([[0, 255, 3], [255, 128, 5]])
    zero = torch.tensor([0.0, 128.0, 4.0])
    weight, residual = centred_weight(codes, zero)
    assert weight.dtype == torch.int8
    torch.testing.assert_close(weight.int() - residual.int(), codes.int() - zero.int())
    assert residual.tolist() == [-128.0, 0.0, 0.0]


@pytest.mark.parametrize("bits", [6, 8])
def test_activation_codes_match_fake_quantization(bits: int) -> None:
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(1)) * 3
    scale, zero = P.qparams_from_range(x.amin(), x.amax() * 0.8, bits)
    codes, residual = activation_codes(x, scale, zero, bits)
    torch.testing.assert_close((codes.float() - residual) * scale, P.fake_quantize(x.clone(), scale, zero, bits))
    assert torch.equal(codes.int() - residual.int(), P.quantize_tensor(x, scale, zero, bits).int() - zero.int())
    assert torch.equal(unsigned_codes(x, scale, zero, bits).int(), P.quantize_tensor(x, scale, zero, bits).int())
    quantizer = ActQuantizer(bits, symmetric=False, router=TimestepRouter(), dynamic=True)
    scale, zero = quantizer.dynamic_qparams(x.amin(1, keepdim=True), x.amax(1, keepdim=True))
    codes, residual = activation_codes(x, scale, zero, bits)
    torch.testing.assert_close((codes.float() - residual) * scale, P.fake_quantize(x.clone(), scale, zero, bits))


def test_reduction_longer_than_int32_allows_is_refused() -> None:
    with pytest.raises(ValueError, match="int32"):
        Int8Matmul(torch.zeros(70_000, 2, dtype=torch.uint8), torch.zeros(2), torch.ones(2), None)


# (weight bits, activation bits): 8 x 8 needs exact int32 sums; 4 x 8 and 8 x 7 keep int16 pair sums exact anywhere
BITS = [(4, 8), pytest.param((8, 8), marks=needs_exact_int8), (8, 7)]


def _quantized_input(x: torch.Tensor, a_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes of ``x`` under a fixed asymmetric range, their scale and zero point, and the dequantized input
    in float64 (exact, unlike bfloat16 arithmetic)."""
    scale = torch.tensor(0.03 * 2 ** (8 - a_bits), dtype=x.dtype)
    zero = torch.tensor(float(77 >> (8 - a_bits)), dtype=x.dtype)
    dequantized = (P.quantize_tensor(x, scale, zero, a_bits).double() - float(zero)) * float(scale)
    return unsigned_codes(x, scale, zero, a_bits), scale, zero, dequantized


def _weight(shape: tuple[int, ...], w_bits: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Weight codes, zero points (channel 0's at 0: at 8 bits it needs the all-ones channel), scales, bias, and
    the dequantized weight in float64."""
    codes = torch.randint(0, 2**w_bits, shape, generator=g)
    w_zero, w_scale = torch.randint(0, 2**w_bits, shape[:1], generator=g).float(), torch.rand(shape[0], generator=g) + 0.1
    w_zero[0] = 0
    view = (-1,) + (1,) * (len(shape) - 1)
    dequantized = (codes.double() - w_zero.double().view(view)) * w_scale.double().view(view)
    return codes, w_zero, w_scale, torch.randn(shape[0], generator=g), dequantized


@pytest.mark.parametrize("geometry", [((1, 1), (1, 1), (1, 1)), ((2, 2), (1, 1), (1, 1)), ((1, 1), (2, 2), (2, 2))])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_conv_equals_the_dequantized_convolution(geometry: tuple, bits: tuple[int, int],
                                                        dtype: torch.dtype) -> None:
    stride, padding, dilation = geometry
    (w_bits, a_bits), g = bits, torch.Generator().manual_seed(2)
    codes, w_zero, w_scale, bias, w_deq = _weight((6, 5, 3, 3), w_bits, g)
    x_codes, scale, zero, x_deq = _quantized_input((torch.randn(2, 5, 9, 9, generator=g) * 2).to(dtype), a_bits)
    conv = OneDNNConv2d(codes, w_zero, w_scale, bias, stride, padding, dilation)
    assert (conv.residual_scaled is not None) == (w_bits == 8)
    out = conv(x_codes, float(scale), int(zero))
    expected = torch.nn.functional.conv2d(x_deq, w_deq, bias.double(), stride, padding, dilation)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("bits", BITS)
def test_onednn_linear_equals_the_dequantized_product(bits: tuple[int, int]) -> None:
    """The kernel for linear layers on CPUs without VNNI, against float64 on the same codes (its worst case included:
    the largest activation code times the largest weight in every pair)."""
    (w_bits, a_bits), g = bits, torch.Generator().manual_seed(3)
    codes, w_zero, w_scale, bias, w_deq = _weight((9, 70), w_bits, g)
    x = torch.randn(13, 70, generator=g) * 2
    x[:, :4] = 1e3  # clamped to the largest code
    codes[1:, :4], w_zero[1:] = 0, 2**w_bits - 1  # centred to -(2**w_bits - 1), or -128 at 8 bits
    w_deq = (codes.double() - w_zero.double()[:, None]) * w_scale.double()[:, None]
    x_codes, scale, zero, x_deq = _quantized_input(x, a_bits)
    linear = OneDNNLinear(codes, w_zero, w_scale, bias)
    assert (linear.residual_scaled is not None) == (w_bits == 8)
    torch.testing.assert_close(linear(x_codes, float(scale), int(zero)).double(), x_deq @ w_deq.t() + bias.double(),
                               rtol=1e-5, atol=1e-3)


def test_int16_pair_sums_bound_the_weights_that_run_without_vnni() -> None:
    assert pair_sums_fit_int16(8, 64) and not pair_sums_fit_int16(8, 65)
    assert pair_sums_fit_int16(7, 128) and pair_sums_fit_int16(4, 128)
    codes = torch.tensor([[0, 255, 3], [255, 128, 5]])
    assert max_centred_weight(codes, torch.tensor([0.0, 128.0, 4.0])) == 128
    assert max_centred_weight(codes[:, 2:], torch.tensor([4.0])) == 1


@pytest.mark.parametrize("bits,symmetric,fits", [(6, False, True), (7, True, True), (7, False, False)])
def test_which_weight_recipes_fit_int16_pair_sums_with_8_bit_activations(bits: int, symmetric: bool,
                                                                          fits: bool) -> None:
    """What the no-VNNI refusal tells users to quantize with: 6-bit or symmetric 7-bit weights always fit, while
    asymmetric 7-bit weights of a lopsided channel (range [-0.2, 1]) do not."""
    weight = torch.linspace(-0.2, 1.0, 64).repeat(3, 1).t()  # (K, N): every column lopsided
    scale, zero_point = P.qparams_from_range(weight.amin(0), weight.amax(0), bits, symmetric)
    codes = P.quantize_tensor(weight, scale, zero_point, bits)
    assert pair_sums_fit_int16(8, max_centred_weight(codes, zero_point)) == fits
