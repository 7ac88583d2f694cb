"""Quantizer numerics: grids, rounding error, per-channel independence, gradients, ranges, bit packing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tacdiff.quant import primitives as P

SWEEP = settings(max_examples=60, deadline=None)
BITS = st.integers(2, 8)


@st.composite
def tensors(draw: st.DrawFn, per_channel: bool | None = None) -> tuple[torch.Tensor, int | None]:
    """A random float tensor (1-4 dims, odd sizes, scale 1e-4..1e4, shifted) and a channel axis or None."""
    shape = draw(st.lists(st.integers(1, 7), min_size=1, max_size=4))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    scale = 10.0 ** draw(st.floats(-4, 4))
    shift = draw(st.floats(-2, 2)) * scale
    x = torch.randn(shape, generator=generator) * scale + shift
    if per_channel is None:
        per_channel = draw(st.booleans())
    axis = draw(st.integers(0, len(shape) - 1)) if per_channel else None
    return x, axis


def grid_params(x: torch.Tensor, axis: int | None, bits: int, symmetric: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max range of ``x`` and its scale / zero point, all broadcast against ``x``."""
    lo, hi = P.minmax_range(x, axis)
    scale, zp = P.qparams_from_range(lo, hi, bits, symmetric)
    b = [P.broadcast_to_axis(p, x, axis) for p in (lo, hi, scale, zp)]
    return b[0], b[1], b[2], b[3]


@SWEEP
@given(data=tensors(), bits=BITS, symmetric=st.booleans())
def test_fake_quantized_values_lie_on_the_grid(data: tuple[torch.Tensor, int | None], bits: int,
                                               symmetric: bool) -> None:
    x, axis = data
    _, _, scale, zp = grid_params(x, axis, bits, symmetric)
    assert torch.equal(zp, zp.round()), "the zero point must be an integer"
    y = P.fake_quantize(x, scale, zp, bits)
    k = torch.round(y / scale + zp)
    assert k.min() >= 0 and k.max() <= 2 ** bits - 1
    torch.testing.assert_close(y, (k - zp) * scale, rtol=1e-6, atol=0)
    codes = P.quantize_tensor(x, scale, zp, bits)
    assert torch.equal(codes, codes.round()) and codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    assert torch.equal(P.dequantize_tensor(codes, scale, zp), y), "fake quantization = dequantize(quantize)"
    for dtype in (torch.float32, torch.bfloat16):  # in place into a weight: the same values
        written = P.dequantize_tensor(codes.to(torch.uint8), scale, zp, dtype, out=torch.empty_like(y, dtype=dtype))
        assert torch.equal(written, y.to(dtype))


@SWEEP
@given(data=tensors(), bits=BITS, symmetric=st.booleans())
def test_rounding_error_is_at_most_half_a_step_inside_the_range(data: tuple[torch.Tensor, int | None],
                                                                bits: int, symmetric: bool) -> None:
    x, axis = data  # every value lies inside its own channel's min-max range
    _, _, scale, zp = grid_params(x, axis, bits, symmetric)
    error = (P.fake_quantize(x, scale, zp, bits) - x).abs()
    bound = scale * 0.5 + 1e-6 * x.abs() + 1e-6 * scale
    assert (error <= bound).all(), (error / scale).max()


@SWEEP
@given(data=tensors(), bits=BITS, symmetric=st.booleans())
def test_values_outside_the_range_clip_to_its_ends(data: tuple[torch.Tensor, int | None], bits: int,
                                                   symmetric: bool) -> None:
    x, axis = data
    _, _, scale, zp = grid_params(x, axis, bits, symmetric)
    top, bottom = (2 ** bits - 1 - zp) * scale, -zp * scale
    above = P.fake_quantize(top + (top - bottom) * torch.rand_like(x) + scale, scale, zp, bits)
    below = P.fake_quantize(bottom - (top - bottom) * torch.rand_like(x) - scale, scale, zp, bits)
    assert torch.equal(above, top.expand_as(above)) and torch.equal(below, bottom.expand_as(below))


@SWEEP
@given(data=tensors(per_channel=True), bits=BITS, symmetric=st.booleans(),
       method=st.sampled_from(["minmax", "percentile", "mse"]), factor=st.floats(0.01, 100))
def test_per_channel_ranges_and_outputs_are_independent(data: tuple[torch.Tensor, int], bits: int, symmetric: bool,
                                                        method: str, factor: float) -> None:
    x, axis = data
    changed = x.clone()
    changed.select(axis, 0).mul_(factor).add_(factor)
    results = []
    for values in (x, changed):
        lo, hi = P.choose_range(values, method, bits, symmetric, axis=axis)  # type: ignore[arg-type]
        scale, zp = P.qparams_from_range(lo, hi, bits, symmetric)
        y = P.fake_quantize(values, P.broadcast_to_axis(scale, values, axis), P.broadcast_to_axis(zp, values, axis),
                            bits)
        results.append((lo[1:], hi[1:], y.narrow(axis, 1, x.shape[axis] - 1)))
    for before, after in zip(*results):
        assert torch.equal(before, after)


@SWEEP
@given(data=tensors(), bits=BITS)
def test_symmetric_zero_point_is_half_the_codes_and_the_range_is_mirrored(data: tuple[torch.Tensor, int | None],
                                                                          bits: int) -> None:
    x, axis = data
    lo, hi, scale, zp = grid_params(x, axis, bits, symmetric=True)
    assert torch.equal(zp, torch.full_like(zp, 2.0 ** (bits - 1)))
    amax = torch.maximum(lo.abs(), hi.abs())
    for end in (amax, -amax):
        torch.testing.assert_close(P.fake_quantize(end, scale, zp, bits), end, rtol=1e-5, atol=0)


@SWEEP
@given(data=tensors(), bits=BITS, symmetric=st.booleans())
def test_zero_is_exactly_representable(data: tuple[torch.Tensor, int | None], bits: int, symmetric: bool) -> None:
    x, axis = data
    _, _, scale, zp = grid_params(x, axis, bits, symmetric)
    assert torch.equal(P.fake_quantize(torch.zeros_like(x), scale, zp, bits), torch.zeros_like(x))


@pytest.mark.parametrize("lo, hi", [(0.5, 2.0), (-3.0, -1.0), (0.0, 0.0), (-1e-30, 1e-30)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ranges_that_exclude_zero_are_widened_to_contain_it(lo: float, hi: float, bits: int) -> None:
    scale, zp = P.qparams_from_range(torch.tensor(lo), torch.tensor(hi), bits)
    assert scale > 0 and 0 <= zp <= 2 ** bits - 1
    assert P.fake_quantize(torch.tensor(0.0), scale, zp, bits) == 0
    for end in (lo, hi):
        assert abs(P.fake_quantize(torch.tensor(end), scale, zp, bits) - end) <= scale / 2 + 1e-6 * abs(end)


@SWEEP
@given(data=tensors(), bits=BITS, symmetric=st.booleans())
def test_straight_through_gradient_is_one_inside_and_zero_outside(data: tuple[torch.Tensor, int | None],
                                                                  bits: int, symmetric: bool) -> None:
    x, axis = data
    _, _, scale, zp = grid_params(x, axis, bits, symmetric)
    wide = (x * 1.7 + 0.3 * x.abs().max()).detach().requires_grad_(True)  # some values beyond the range
    P.fake_quantize(wide, scale, zp, bits).sum().backward()
    position = wide.detach() / scale + zp  # fractional code before clamping
    inside = (position > 0.01) & (position < 2 ** bits - 1.01)
    outside = (position < -0.51) | (position > 2 ** bits - 0.49)
    assert wide.grad is not None
    assert torch.equal(wide.grad[inside], torch.ones_like(wide.grad[inside]))
    assert torch.equal(wide.grad[outside], torch.zeros_like(wide.grad[outside]))


def test_round_ste_rounds_forward_and_passes_gradients_unchanged() -> None:
    x = torch.tensor([-1.6, -0.4, 0.2, 0.5, 1.5, 2.7], requires_grad=True)
    y = P.round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    (y * torch.arange(6.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(6.0))
    assert torch.equal(P.round_ste(x.detach()), torch.round(x.detach()))


def channel_mse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                axis: int | None) -> torch.Tensor:
    scale, zp = P.qparams_from_range(lo, hi, bits, symmetric)
    y = P.fake_quantize(x, P.broadcast_to_axis(scale, x, axis), P.broadcast_to_axis(zp, x, axis), bits)
    return P.channels_first((y - x).pow(2), axis).mean(1)


@SWEEP
@given(data=tensors(), bits=BITS, symmetric=st.booleans())
def test_mse_range_is_never_worse_than_minmax(data: tuple[torch.Tensor, int | None], bits: int,
                                              symmetric: bool) -> None:
    x, axis = data
    mse = channel_mse(x, *P.mse_range(x, bits, symmetric, axis), bits, symmetric, axis)
    minmax = channel_mse(x, *P.minmax_range(x, axis), bits, symmetric, axis)
    assert (mse <= minmax * (1 + 1e-5)).all(), (mse, minmax)


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_range_clips_outliers_and_beats_minmax_on_gaussian_data(symmetric: bool) -> None:
    x = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0))
    mse_lo, mse_hi = P.mse_range(x, 4, symmetric, axis=0)
    mm_lo, mm_hi = P.minmax_range(x, axis=0)
    assert (mse_hi < mm_hi).all() and (mse_lo > mm_lo).all()
    mse = channel_mse(x, mse_lo, mse_hi, 4, symmetric, 0)
    minmax = channel_mse(x, mm_lo, mm_hi, 4, symmetric, 0)
    assert (mse < 0.8 * minmax).all(), (mse / minmax)


@SWEEP
@given(data=tensors(), percentile=st.floats(50.5, 100.0))
def test_percentile_range_lies_inside_minmax(data: tuple[torch.Tensor, int | None], percentile: float) -> None:
    x, axis = data
    lo, hi = P.percentile_range(x, percentile, axis)
    mm_lo, mm_hi = P.minmax_range(x, axis)
    assert (lo >= mm_lo).all() and (hi <= mm_hi).all() and (lo <= hi).all()


@SWEEP
@given(data=tensors(per_channel=True), block=st.one_of(st.none(), st.integers(1, 8)))
def test_blocks_hold_consecutive_chunks_padded_with_the_last_entry(data: tuple[torch.Tensor, int],
                                                                  block: int | None) -> None:
    x, dim = data
    size = x.shape[dim]
    width = size if block is None else min(block, size)
    blocks = P.to_blocks(x, dim, block)
    assert blocks.shape == (*x.shape[:dim], -(-size // width), width, *x.shape[dim + 1:])
    for k, chunk in enumerate(x.split(width, dim)):
        got = blocks.select(dim, k)
        assert torch.equal(got.narrow(dim, 0, chunk.shape[dim]), chunk)
        padding = got.narrow(dim, chunk.shape[dim], width - chunk.shape[dim])
        assert torch.equal(padding, chunk.narrow(dim, chunk.shape[dim] - 1, 1).expand_as(padding))
    assert torch.equal(P.from_blocks(blocks, dim, size), x)


def test_percentile_range_matches_numpy_and_100_is_minmax() -> None:
    x = torch.randn(3, 5001, generator=torch.Generator().manual_seed(1)) ** 3
    lo, hi = P.percentile_range(x, 99.0, axis=0)
    np.testing.assert_allclose(hi.numpy(), np.percentile(x.numpy(), 99.0, axis=1), rtol=1e-5)
    np.testing.assert_allclose(lo.numpy(), np.percentile(x.numpy(), 1.0, axis=1), rtol=1e-5)
    full = P.percentile_range(x, 100.0, axis=0)
    assert all(torch.equal(a, b) for a, b in zip(full, P.minmax_range(x, axis=0)))


@pytest.mark.parametrize("percentile", [50.0, 100.01, -1.0])
def test_percentile_outside_50_to_100_raises(percentile: float) -> None:
    with pytest.raises(ValueError, match=r"percentile must be in \(50, 100\]"):
        P.percentile_range(torch.randn(10), percentile)


def test_choose_range_dispatches_and_rejects_unknown_methods() -> None:
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    for method, expected in [("minmax", P.minmax_range(x, 0)), ("percentile", P.percentile_range(x, 99.0, 0)),
                             ("mse", P.mse_range(x, 4, axis=0))]:
        got = P.choose_range(x, method, 4, axis=0, percentile=99.0)  # type: ignore[arg-type]
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    with pytest.raises(ValueError, match="range method must be"):
        P.choose_range(x, "entropy", 4)  # type: ignore[arg-type]


@settings(max_examples=80, deadline=None)
@given(bits=BITS, shape=st.lists(st.integers(0, 9), min_size=0, max_size=3), seed=st.integers(0, 2 ** 31 - 1))
def test_pack_unpack_roundtrip(bits: int, shape: list[int], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, tuple(shape), generator=generator, dtype=torch.uint8)
    packed = P.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == math.ceil(codes.numel() * bits / 8)
    unpacked = P.unpack_codes(packed, bits, tuple(shape))
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked, codes)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("numel", [1, 3, 7, 13, 1001])
def test_pack_unpack_every_width_and_odd_size(bits: int, numel: int) -> None:
    codes = torch.arange(numel) % (2 ** bits)  # every code value, float-free
    codes = codes.flip(0).reshape(numel).to(torch.float32)  # codes arrive as float from quantize_tensor
    packed = P.pack_codes(codes, bits)
    assert packed.numel() == (numel * bits + 7) // 8
    assert torch.equal(P.unpack_codes(packed, bits, (numel,)), codes.to(torch.uint8))


def test_unpack_rejects_a_wrong_byte_count() -> None:
    packed = P.pack_codes(torch.zeros(10), 3)
    with pytest.raises(ValueError, match="corrupt"):
        P.unpack_codes(packed[:-1], 3, (10,))
    with pytest.raises(ValueError, match="corrupt"):
        P.unpack_codes(packed, 3, (11, 2))


@pytest.mark.parametrize("codes", [[16.0, 3.0], [-1.0], [300.0]])
def test_pack_rejects_codes_outside_the_bit_width(codes: list[float]) -> None:
    with pytest.raises(ValueError, match="4"):
        P.pack_codes(torch.tensor(codes), 4)


BAD_BITS = [1, 9, 0, -3, True, 4.0, "8", None]
BITS_TAKERS = {
    "check_bits": lambda b: P.check_bits(b),
    "qparams_from_range": lambda b: P.qparams_from_range(torch.tensor(-1.0), torch.tensor(1.0), b),
    "mse_range": lambda b: P.mse_range(torch.randn(8), b),
    "choose_range(mse)": lambda b: P.choose_range(torch.randn(8), "mse", b),
    "pack_codes": lambda b: P.pack_codes(torch.zeros(4), b),
    "unpack_codes": lambda b: P.unpack_codes(torch.zeros(1, dtype=torch.uint8), b, (1,)),
}
UNCHECKED_BITS = {
    "choose_range(minmax)": lambda b: P.choose_range(torch.randn(8), "minmax", b),
    "choose_range(percentile)": lambda b: P.choose_range(torch.randn(8), "percentile", b),
    "quantize_tensor": lambda b: P.quantize_tensor(torch.randn(8), torch.tensor(0.1), torch.tensor(0.0), b),
    "fake_quantize": lambda b: P.fake_quantize(torch.randn(8), torch.tensor(0.1), torch.tensor(0.0), b),
}


@pytest.mark.parametrize("bits", BAD_BITS, ids=repr)
@pytest.mark.parametrize("function", list(BITS_TAKERS))
def test_bad_bit_widths_raise_a_helpful_value_error(function: str, bits: object) -> None:
    with pytest.raises(ValueError, match=r"must be an integer in 2\.\.8, got " + repr(bits).replace(".", r"\.")):
        BITS_TAKERS[function](bits)


@pytest.mark.parametrize("bits", [1, 9], ids=repr)
@pytest.mark.parametrize("function", list(UNCHECKED_BITS))
def test_bad_bit_widths_raise_in_every_function_that_takes_bits(function: str, bits: object) -> None:
    with pytest.raises(ValueError, match=r"2\.\.8"):
        UNCHECKED_BITS[function](bits)


def test_check_bits_names_the_setting_and_returns_good_values() -> None:
    assert [P.check_bits(b) for b in range(2, 9)] == list(range(2, 9))
    with pytest.raises(ValueError, match="act_bits must be an integer in 2..8, got 9"):
        P.check_bits(9, "act_bits")


RANGE_FUNCTIONS = {
    "minmax_range": lambda x: P.minmax_range(x),
    "minmax_range(axis)": lambda x: P.minmax_range(x.reshape(1, -1), axis=0),
    "percentile_range": lambda x: P.percentile_range(x),
    "mse_range": lambda x: P.mse_range(x, 4),
    "choose_range": lambda x: P.choose_range(x, "minmax", 8),
    "check_tensor": lambda x: P.check_tensor(x),
}


@pytest.mark.parametrize("function", list(RANGE_FUNCTIONS))
def test_empty_tensors_raise(function: str) -> None:
    with pytest.raises(ValueError, match="empty"):
        RANGE_FUNCTIONS[function](torch.zeros(0))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("function", list(RANGE_FUNCTIONS))
def test_non_finite_values_raise(function: str, bad: float) -> None:
    x = torch.tensor([0.5, bad, -1.0])
    with pytest.raises(ValueError, match="NaN or inf"):
        RANGE_FUNCTIONS[function](x)


def test_qparams_from_a_nan_range_raise() -> None:
    with pytest.raises(ValueError, match="NaN"):
        P.qparams_from_range(torch.tensor(float("nan")), torch.tensor(1.0), 8)


@SWEEP
@given(data=tensors(per_channel=False), bits=BITS, symmetric=st.booleans())
def test_in_place_fast_path_equals_the_autograd_path(data: tuple[torch.Tensor, None], bits: int,
                                                     symmetric: bool) -> None:
    x, _ = data
    scale, zp = P.qparams_from_range(*P.minmax_range(x * 1.3), bits, symmetric)  # some values clip
    wide = x * 1.6
    before = wide.clone()
    fast = P.fake_quantize(wide, scale, zp, bits)
    tracked = P.fake_quantize(wide.clone().requires_grad_(True), scale, zp, bits)
    assert torch.equal(fast, tracked.detach())
    assert torch.equal(wide, before), "the fast path must not modify its input"
