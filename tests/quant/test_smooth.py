"""SmoothQuant channel balancing: the scales' formula, exactness before rounding, what it buys on a tiny DiT with
outlier channels in its adaLN-modulated inputs, and artifacts that keep it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tacdiff
from tacdiff.backends.int8 import unsupported_reason
from tacdiff.io.artifact import load_quantized, save_quantized
from tacdiff.models.kinds import ModelDenoiser
from tacdiff.quant.layers import QuantLinear
from tacdiff.quant.smooth import balanced_layers, smoothing_scales

from tiny_models import NUM_SAMPLES, calibration_of, quantized_copy, sqnr_db, tiny_cond, tiny_model


def test_scales_move_the_activation_outliers_into_the_weights() -> None:
    act, weight = torch.tensor([1.0, 100.0, 4.0]), torch.tensor([[2.0, 1.0, -4.0], [-1.0, 0.5, 1.0]])
    torch.testing.assert_close(smoothing_scales(act, weight, 0.5), torch.tensor([0.5 ** 0.5, 10.0, 1.0]))
    torch.testing.assert_close(smoothing_scales(act, weight, 1.0), act)  # every input channel's maximum becomes 1
    torch.testing.assert_close(smoothing_scales(act, weight, 0.0), 1 / torch.tensor([2.0, 1.0, 4.0]))
    assert torch.isfinite(smoothing_scales(torch.zeros(3), torch.zeros(2, 3), 0.5)).all(), "dead channels stay finite"


def test_balancing_keeps_the_float_product() -> None:
    linear = nn.Linear(6, 4)
    layer = QuantLinear.from_float(linear, 8, False, None, None)
    layer.enable_smoothing()
    layer.set_smoothing(torch.tensor([0.1, 1.0, 10.0, 3.0, 0.5, 2.0]))
    x = torch.randn(5, 6)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-6)


def _with_outliers() -> nn.Module:
    """A tiny DiT whose modulation shifts three channels of every block's attention and MLP inputs far out, as the
    adaLN layers of trained DiTs do to a few channels."""
    model = tiny_model("dit")
    for block in model.transformer_blocks:
        with torch.no_grad():
            modulation, width = block.norm1.linear, block.norm1.norm.normalized_shape[0]
            modulation.bias[[1, 5, 9]] += 40.0  # shift_msa: the first of its six chunks
            modulation.bias[3 * width + 2] += 40.0  # shift_mlp
    return model


@pytest.fixture(scope="module")
def outlier_dit() -> tuple[nn.Module, tacdiff.CalibrationSet, tacdiff.CalibrationSet]:
    model = _with_outliers()
    calibration = calibration_of(model, 0, cond=tiny_cond("dit", NUM_SAMPLES, 0))
    held_out = calibration_of(model, 1, cond=tiny_cond("dit", NUM_SAMPLES, 1))
    return model, calibration, held_out


@torch.no_grad()
def _sqnr(fp: nn.Module, quant: nn.Module, data: tacdiff.CalibrationSet) -> float:
    x, t, cond = data.x, data.timesteps, data.cond_of(torch.arange(len(data.x)))
    return sqnr_db(ModelDenoiser(fp)(x, t, **cond), ModelDenoiser(quant)(x, t, **cond))


ONLY_BALANCED = ("*.to_out.*", "*.ff.net.2", "proj_out*", "*norm1.*", "pos_embed*")
"""Every other linear layer of the tiny DiT, left float so that the error comes from the balanced layers."""


@pytest.mark.parametrize("rounding, act_bits", [("rtn", 6), ("gptq", 6)])
def test_balancing_the_modulated_inputs_lowers_the_activation_error(outlier_dit: tuple, rounding: str,
                                                                    act_bits: int) -> None:
    fp, calibration, held_out = outlier_dit
    config = dict(weight_bits=8, act_bits=act_bits, weight_rounding=rounding, exclude=ONLY_BALANCED,
                  quantize_attention_matmuls=False)
    plain = quantized_copy(fp, calibration, **config)
    balanced = quantized_copy(fp, calibration, smooth_alpha=0.5, **config)
    names = [name for name, _ in balanced_layers(balanced)]
    assert names and all(name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "proj") for name in names)
    before, after = _sqnr(fp, plain, held_out), _sqnr(fp, balanced, held_out)
    print(f"{rounding} W8A{act_bits}: output SQNR {before:.2f} dB plain, {after:.2f} dB balanced")
    assert after > before + 2


def test_a_balanced_artifact_loads_with_its_divisors(outlier_dit: tuple, tmp_path) -> None:
    fp, calibration, held_out = outlier_dit
    quant = quantized_copy(fp, calibration, weight_bits=4, act_bits=8, smooth_alpha=0.5)
    loaded = load_quantized(save_quantized(quant, tmp_path / "q"))
    x, t, cond = held_out.x[:4], held_out.timesteps[:4], held_out.cond_of(torch.arange(4))
    with torch.no_grad():
        assert torch.equal(ModelDenoiser(loaded)(x, t, **cond), ModelDenoiser(quant)(x, t, **cond))
    _, layer = balanced_layers(loaded)[0]
    assert not torch.equal(layer.smooth, torch.ones_like(layer.smooth))
    assert "channel-balanced" in unsupported_reason(layer, torch.device("cpu"))


def test_balancing_needs_calibration_inputs_and_a_sane_alpha() -> None:
    with pytest.raises(ValueError, match="smooth_alpha must be a number in"):
        tacdiff.QuantConfig(smooth_alpha=1.5)
    with pytest.raises(ValueError, match="channel balancing"):
        tacdiff.quantize(copy.deepcopy(tiny_model("dit")), tacdiff.QuantConfig(act_range="dynamic", smooth_alpha=0.5))
