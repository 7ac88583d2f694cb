"""Quantized building blocks: the timestep router, range observer, activation quantizer and Conv2d/Linear twins."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tacdiff.quant import primitives as P
from tacdiff.quant.layers import ActQuantizer, QuantConv2d, QuantLinear, RangeObserver, TimestepRouter


@pytest.mark.parametrize("groups, total, expected", [
    (4, 1000, {0: 0, 1: 0, 249: 0, 249.99: 0, 250: 1, 499: 1, 499.5: 1, 500: 2, 749: 2, 750: 3, 999: 3}),
    (3, 1000, {333: 0, 333.33: 0, 333.34: 1, 666: 1, 666.67: 2, 999: 2}),
    (2, 10, {0: 0, 4: 0, 4.999: 0, 5: 1, 9: 1}),
    (1, 1000, {0: 0, 500: 0, 999: 0}),
])
def test_group_of_picks_the_interval_at_boundaries(groups: int, total: int, expected: dict[float, int]) -> None:
    router = TimestepRouter(groups, total)
    got = {t: router.group_of(t) for t in expected}
    assert got == expected
    assert {t: router.group_of(torch.tensor([t, t])) for t in expected} == expected, "tensors and numbers agree"


def test_timesteps_beyond_the_training_range_fall_in_the_end_groups() -> None:
    router = TimestepRouter(4, 1000)
    assert router.group_of(1000) == 3 and router.group_of(5000.0) == 3 and router.group_of(-1) == 0


def test_a_batch_mixing_groups_raises_but_one_group_is_fine() -> None:
    router = TimestepRouter(4, 1000)
    assert router.group_of(torch.tensor([250, 300, 499])) == 1
    with pytest.raises(ValueError, match="mixes timesteps"):
        router.group_of(torch.tensor([249, 250]))
    with pytest.raises(ValueError, match="mixes timesteps"):
        router.set_timestep(torch.tensor([10.0, 900.0]))
    with pytest.raises(ValueError, match="empty"):
        router.group_of(torch.tensor([]))
    single = TimestepRouter(1, 1000)
    single.set_timestep(torch.tensor([10.0, 900.0]))
    assert single.group == 0


def test_set_timestep_selects_the_group() -> None:
    router = TimestepRouter(4, 1000)
    for t, g in [(999, 3), (10, 0), (600, 2)]:
        router.set_timestep(torch.tensor(t))
        assert router.group == g


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), [10.0, float("nan")]])
def test_a_non_finite_timestep_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="finite"):
        TimestepRouter(4, 1000).group_of(torch.tensor(bad))


def test_range_observer_keeps_exact_extremes_and_a_bounded_sample() -> None:
    observer = RangeObserver(groups=2, segments=1, per_call=64, cap=1000)
    generator = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(50):
        x = torch.randn(4, 100, generator=generator)
        seen.append(x)
        observer.observe([x], group=1, name="layer")
    assert observer.samples(0, 0) is None
    values = observer.samples(1, 0)
    everything = torch.cat([s.flatten() for s in seen])
    assert values.numel() <= 1000 + 64 + 2
    assert values.min() == everything.min() and values.max() == everything.max()
    assert torch.isin(values, everything).all(), "only observed values are kept"


def test_range_observer_samples_every_call_in_proportion_to_its_size() -> None:
    observer = RangeObserver(groups=1, segments=1, per_call=100, cap=2000)
    sizes = [1000, 500] * 50  # uneven calls, and ten times the cap in all
    for call, size in enumerate(sizes):
        observer.observe([torch.full((size,), float(call))], group=0, name="layer")
    counts = torch.bincount(observer.samples(0, 0).long(), minlength=len(sizes)).double()
    share = counts / counts.sum()
    expected = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    halves = share[:50].sum().item(), share[50:].sum().item()
    assert abs(halves[0] - 0.5) < 0.05, f"early calls hold {halves[0]:.2f} of the sample, late ones {halves[1]:.2f}"
    assert abs(share[0::2].sum().item() - expected[0::2].sum().item()) < 0.05, "larger calls weigh more"


def test_range_observer_rejects_non_finite_values_naming_the_module() -> None:
    observer = RangeObserver(groups=1, segments=1)
    with pytest.raises(ValueError, match="'down_blocks.0.conv1.act_quant'"):
        observer.observe([torch.tensor([1.0, float("inf")])], group=0, name="down_blocks.0.conv1.act_quant")


def test_act_quantizer_passes_through_until_calibrated_then_uses_the_running_group() -> None:
    router = TimestepRouter(2, 1000)
    quant = ActQuantizer(4, symmetric=False, router=router)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 2
    assert torch.equal(quant(x), x)
    quant.set_ranges(torch.tensor([[-1.0], [-3.0]]), torch.tensor([[1.0], [3.0]]))
    for group, (lo, hi) in enumerate([(-1.0, 1.0), (-3.0, 3.0)]):
        router.set_timestep(group * 600)
        scale, zp = P.qparams_from_range(torch.tensor(lo), torch.tensor(hi), 4)
        reference = P.fake_quantize(x, scale, zp, 4)
        # a fused kernel may round a value within float error of a half step the other way
        torch.testing.assert_close(quant(x), reference, atol=float(scale) * 1.0001, rtol=0)
        assert (quant(x) == reference).float().mean() > 0.99
        assert quant(x).unique().numel() <= 16


def test_act_quantizer_split_gives_each_segment_its_own_range() -> None:
    router = TimestepRouter()
    quant = ActQuantizer(8, symmetric=False, router=router, split=3)
    assert quant.scale.shape == (1, 2)
    x = torch.cat([torch.rand(2, 3, 4, 4) * 0.01, torch.rand(2, 5, 4, 4) * 100], dim=1)
    quant.set_ranges(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.01, 100.0]]))
    y = quant(x)
    assert y.shape == x.shape
    assert (y[:, :3] - x[:, :3]).abs().max() <= 0.01 / 255 / 2 * 1.001
    assert (y[:, 3:] - x[:, 3:]).abs().max() <= 100 / 255 / 2 * 1.001


@pytest.mark.parametrize("split", [None, 3])
def test_dynamic_act_quantizer_gives_every_sample_its_own_minmax_range(split: int | None) -> None:
    quant = ActQuantizer(8, symmetric=False, router=TimestepRouter(), split=split, dynamic=True)
    assert quant.enabled, "a dynamic quantizer needs no calibration"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 4, 4, generator=generator) * torch.tensor([0.01, 1.0, 100.0])[:, None, None, None]
    y = quant(x)
    for part_x, part_y in zip(quant.parts(x), quant.parts(y)):
        for sample, out in zip(part_x, part_y):
            lo, hi = min(sample.min().item(), 0.0), max(sample.max().item(), 0.0)
            step = (hi - lo) / 255
            assert (out - sample).abs().max() <= step / 2 * 1.001
            assert abs(out.min() - sample.min()) <= step / 2 and abs(out.max() - sample.max()) <= step / 2
            assert (out / step).sub((out / step).round()).abs().max() < 1e-3, "values on the sample's grid"
    changed = x.clone()
    changed[2] *= 1000
    assert torch.equal(quant(changed)[:2], y[:2]), "one sample's range must not move another's"


@pytest.mark.parametrize("shape, token_dim, block", [((2, 6, 3, 3), 1, None), ((2, 5, 7), -1, None),
                                                     ((2, 6, 3, 3), 1, 4), ((2, 5, 7), -1, 3), ((2, 5, 7), -1, 7)])
def test_dynamic_per_token_quantizer_gives_every_token_block_its_own_minmax_range(
        shape: tuple[int, ...], token_dim: int, block: int | None) -> None:
    quant = ActQuantizer(8, symmetric=False, router=TimestepRouter(), dynamic=True, token_dim=token_dim,
                         block_size=block)
    generator = torch.Generator().manual_seed(0)
    per_entry_scale = torch.rand(shape, generator=generator).mul(12).sub(10).exp()
    x = torch.randn(shape, generator=generator) * per_entry_scale  # entries over 5 orders of magnitude
    y = quant(x)
    width = block or shape[token_dim]
    blocks_x, blocks_y = (t.movedim(token_dim, -1).split(width, -1) for t in (x, y))
    for chunk_x, chunk_y in zip(blocks_x, blocks_y):  # the k-th block of every token
        for tokens, outs in zip(chunk_x.flatten(0, -2), chunk_y.flatten(0, -2)):
            step = (max(tokens.max().item(), 0.0) - min(tokens.min().item(), 0.0)) / 255
            assert (outs - tokens).abs().max() <= step / 2 * 1.001
            assert (outs / step).sub((outs / step).round()).abs().max() < 1e-3, "values on the block's grid"
    changed = x.clone()
    changed.movedim(token_dim, -1)[(0,) * (x.dim() - 1)][0] *= 1000  # the first entry of the first token
    moved = (quant(changed) != y).movedim(token_dim, -1).flatten(0, -2)
    assert moved[0, :width].any()
    assert not moved[0, width:].any() and not moved[1:].any(), "one block's range must not move other values"


def test_dynamic_act_quantizer_keeps_an_all_zero_sample_finite_and_zero() -> None:
    quant = ActQuantizer(8, symmetric=True, router=TimestepRouter(), dynamic=True)
    x = torch.cat([torch.zeros(1, 5), torch.randn(1, 5)]).half()
    y = quant(x)
    assert torch.isfinite(y).all() and torch.equal(y[0], x[0])


def test_a_calibrated_zero_range_stays_finite_in_half_precision() -> None:
    quant = ActQuantizer(8, symmetric=False, router=TimestepRouter())
    quant.set_ranges(torch.zeros(1, 1), torch.zeros(1, 1))  # a layer input that was always zero
    x = torch.zeros(2, 3).half()
    assert torch.equal(quant(x), x)


def test_act_quantizer_rejects_bad_bits() -> None:
    with pytest.raises(ValueError, match="act_bits"):
        ActQuantizer(9, False, TimestepRouter())


def float_layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(6, 5, 1, bias=False), nn.Linear(6, 5), nn.Linear(6, 5, bias=False)]


def quant_twin(layer: nn.Module, bits: int, symmetric: bool = False, split: int | None = None,
               act: ActQuantizer | None = None) -> QuantConv2d | QuantLinear:
    cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
    return cls.from_float(layer, bits, symmetric, split, act)


def input_for(layer: nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (2, 6, 5, 5) if isinstance(layer, nn.Conv2d) else (2, 6)
    return torch.randn(shape, generator=generator)


@pytest.mark.parametrize("index", range(4))
def test_twin_matches_the_float_layer_before_quantizing_weights(index: int) -> None:
    layer = float_layers()[index]
    twin = quant_twin(layer, 4)
    x = input_for(layer)
    assert torch.equal(twin(x), layer(x))
    assert twin.weight is not layer.weight and not twin.weight.requires_grad


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("index", range(4))
def test_weights_become_the_exact_dequantization_of_integer_codes(index: int, bits: int, symmetric: bool) -> None:
    layer = float_layers()[index]
    twin = quant_twin(layer, bits, symmetric)
    twin.quantize_weight("minmax")
    codes = twin.weight_codes
    assert codes.dtype == torch.uint8 and codes.shape == layer.weight.shape and int(codes.max()) <= 2 ** bits - 1
    assert twin.weight_scale.shape == (layer.weight.shape[0], 1)
    expected = (codes.float() - twin.expand(twin.weight_zero_point)) * twin.expand(twin.weight_scale)
    assert torch.equal(twin.weight, expected)
    step = twin.expand(twin.weight_scale)
    assert ((twin.weight - layer.weight).abs() <= step / 2 * 1.0001).all()
    x = input_for(layer)
    reference = (F.conv2d(x, twin.weight, layer.bias, padding=layer.padding) if isinstance(layer, nn.Conv2d)
                 else F.linear(x, twin.weight, layer.bias))
    assert torch.equal(twin(x), reference), "the layer computes with the dequantized weight"


def test_each_output_channel_gets_its_own_weight_range() -> None:
    layer = nn.Linear(8, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 8) * torch.tensor([[0.01], [1.0], [100.0], [3.0]]))
    twin = quant_twin(layer, 8)
    twin.quantize_weight("minmax")
    spans = layer.weight.amax(1).clamp(min=0) - layer.weight.amin(1).clamp(max=0)
    torch.testing.assert_close(twin.weight_scale[:, 0], spans / 255)


def test_split_weights_get_a_range_per_input_segment() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, 3)
    with torch.no_grad():
        conv.weight[:, :3] *= 0.001  # a hidden half of tiny weights next to a large skip half
    twin = quant_twin(conv, 4, split=3)
    twin.quantize_weight("minmax")
    assert twin.weight_scale.shape == (4, 2)
    for segment, channels in enumerate([slice(0, 3), slice(3, 8)]):
        lo, hi = P.minmax_range(conv.weight[:, channels], axis=0)
        scale, zp = P.qparams_from_range(lo, hi, 4)
        assert torch.equal(twin.weight_scale[:, segment], scale)
        assert torch.equal(twin.weight_zero_point[:, segment], zp)
        step = scale[:, None, None, None]
        assert ((twin.weight[:, channels] - conv.weight[:, channels]).abs() <= step / 2 * 1.0001).all(), segment
    unsplit = quant_twin(conv, 4)
    unsplit.quantize_weight("minmax")
    small_error = (twin.weight[:, :3] - conv.weight[:, :3]).abs().max()
    assert small_error < 0.1 * (unsplit.weight[:, :3] - conv.weight[:, :3]).abs().max()


def test_refresh_weight_rebuilds_the_weight_from_loaded_codes() -> None:
    layer = float_layers()[0]
    twin = quant_twin(layer, 4)
    twin.quantize_weight("mse")
    state = {k: v.clone() for k, v in twin.state_dict().items()}
    fresh = quant_twin(nn.Conv2d(6, 5, 3, padding=1), 4)
    fresh.load_state_dict({**state, "weight": torch.zeros_like(state["weight"])})
    fresh.refresh_weight()
    assert torch.equal(fresh.weight, twin.weight)


@pytest.mark.parametrize("index", [0, 2])
def test_the_input_goes_through_the_activation_quantizer(index: int) -> None:
    layer = float_layers()[index]
    router = TimestepRouter()
    act = ActQuantizer(4, False, router)
    act.set_ranges(torch.tensor([[-1.0]]), torch.tensor([[1.0]]))
    twin = quant_twin(layer, 8, act=act)
    twin.quantize_weight("minmax")
    x = input_for(layer)
    plain = quant_twin(layer, 8)
    plain.quantize_weight("minmax")
    assert torch.equal(twin(x), plain(act(x)))
    assert not torch.equal(twin(x), plain(x))


def test_a_fresh_range_observer_replays_the_same_sample() -> None:
    observer = RangeObserver(groups=2, segments=1, per_call=50, cap=300, seed=3)
    calls = [torch.randn(7, 40, generator=torch.Generator().manual_seed(i)) for i in range(30)]
    for i, x in enumerate(calls):
        observer.observe([x], group=i % 2, name="layer")
    fresh = observer.fresh()
    assert fresh.samples(0, 0) is None, "empty"
    for i, x in enumerate(calls):
        fresh.observe([x], group=i % 2, name="layer")
    assert all(torch.equal(fresh.samples(g, 0), observer.samples(g, 0)) for g in range(2))
