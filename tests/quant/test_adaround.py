"""Learned rounding (AdaRound + BRECQ block reconstruction) on tiny real diffusers UNets."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn

import tacdiff
import tacdiff.quant.adaround as adaround
from tacdiff.quant import primitives as P
from tacdiff.quant.adaround import quant_layers, reconstruction_units
from tacdiff.quant.layers import ActQuantizer, QuantConv2d, QuantLinear
from tiny_models import tiny_model

ITERS, LR, BATCH = 100, 1e-2, 8


def calibration_of(model: nn.Module, seed: int, **kwargs: object) -> tacdiff.CalibrationSet:
    return tacdiff.collect_calibration_set(model, DDPMScheduler(), num_samples=8, num_inference_steps=10,
                                           kept_steps=5, seed=seed, progress=False, **kwargs)


def adaround_config(**overrides: object) -> tacdiff.QuantConfig:
    settings = dict(weight_bits=4, act_bits=None, weight_rounding="adaround", adaround_iters=ITERS,
                    adaround_lr=LR, adaround_batch_size=BATCH)
    return tacdiff.QuantConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    return tiny_model("unet")


@pytest.fixture(scope="module")
def calibration(unet: UNet2DModel) -> tacdiff.CalibrationSet:
    return calibration_of(unet, seed=0)


@pytest.fixture(scope="module")
def held_out(unet: UNet2DModel) -> tacdiff.CalibrationSet:
    return calibration_of(unet, seed=1)


@pytest.fixture(scope="module")
def rtn(unet: UNet2DModel) -> nn.Module:
    return tacdiff.quantize(copy.deepcopy(unet), tacdiff.QuantConfig(weight_bits=4, act_bits=None), progress=False)


@pytest.fixture(scope="module")
def learned(unet: UNet2DModel, calibration: tacdiff.CalibrationSet) -> nn.Module:
    return tacdiff.quantize(copy.deepcopy(unet), adaround_config(), calibration, progress=False)


def unit_outputs(model: nn.Module, data: tacdiff.CalibrationSet, names: list[str]
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every named unit's output and the model's output over ``data``."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: seen[n].append(out))
               for n in names]
    with torch.no_grad():
        final = torch.cat([model(x, t).sample for x, t, _ in data.batches(64)])
    for handle in handles:
        handle.remove()
    return {n: torch.cat(v) for n, v in seen.items()}, final


def errors(quantized: nn.Module, fp: nn.Module, data: tacdiff.CalibrationSet
           ) -> tuple[dict[str, float], float]:
    names = [n for n, _ in reconstruction_units(quantized)]
    q_units, q_out = unit_outputs(quantized, data, names)
    fp_units, fp_out = unit_outputs(fp, data, names)
    per_unit = {n: (q_units[n] - fp_units[n]).pow(2).mean().item() for n in names}
    return per_unit, (q_out - fp_out).pow(2).mean().item()


def test_units_partition_the_quantized_layers(rtn: nn.Module) -> None:
    units = reconstruction_units(rtn)
    names = [n for n, _ in units]
    assert not [a for a in names for b in names if a.startswith(f"{b}.")], "a unit is nested in another"
    owners = {}
    for name, unit in units:
        for sub, _ in quant_layers(unit):
            owners.setdefault(f"{name}.{sub}" if sub else name, []).append(name)
    layers = [n for n, m in rtn.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert sorted(owners) == sorted(layers)
    assert all(len(v) == 1 for v in owners.values())
    assert {"down_blocks.0.resnets.0", "down_blocks.1.attentions.0", "mid_block.attentions.0",
            "conv_in", "conv_out", "time_embedding.linear_1"} <= set(names)


def test_units_are_reconstructed_in_forward_order(unet: UNet2DModel, calibration: tacdiff.CalibrationSet,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[nn.Module] = []
    monkeypatch.setattr(adaround, "_reconstruct", lambda unit, *args: called.append(unit))
    model = tacdiff.quantize(copy.deepcopy(unet), adaround_config(), calibration, progress=False)
    name_of = {id(m): n for n, m in model.named_modules()}
    order = [name_of[id(unit)] for unit in called]
    # registration order would put attentions before resnets and up blocks before the mid block
    assert order.index("down_blocks.1.resnets.0") < order.index("down_blocks.1.attentions.0")
    assert order.index("mid_block.resnets.1") < order.index("up_blocks.0.resnets.0")
    assert order[0] in ("conv_in", "time_embedding.linear_1") and order[-1] == "conv_out"


def test_learned_rounding_beats_rtn_on_every_block(unet: UNet2DModel, rtn: nn.Module, learned: nn.Module,
                                                   held_out: tacdiff.CalibrationSet) -> None:
    rtn_err, _ = errors(rtn, unet, held_out)
    learned_err, _ = errors(learned, unet, held_out)
    ratios = {n: learned_err[n] / rtn_err[n] for n in rtn_err}
    assert all(r < 1.0 for r in ratios.values()), ratios
    four_bit = [n for n, _ in reconstruction_units(learned) if n not in ("conv_in", "conv_out")]
    assert sum(ratios[n] for n in four_bit) / len(four_bit) < 0.7, ratios


def test_learned_rounding_beats_rtn_on_model_output(unet: UNet2DModel, rtn: nn.Module, learned: nn.Module,
                                                    held_out: tacdiff.CalibrationSet) -> None:
    _, rtn_err = errors(rtn, unet, held_out)
    _, learned_err = errors(learned, unet, held_out)
    assert learned_err < 0.75 * rtn_err, (learned_err, rtn_err)


def test_codes_are_integers_and_weights_their_exact_dequantization(rtn: nn.Module, learned: nn.Module) -> None:
    rtn_layers = dict(rtn.named_modules())
    changed = 0
    for name, layer in learned.named_modules():
        if not isinstance(layer, (QuantConv2d, QuantLinear)):
            continue
        codes, reference = layer.weight_codes, rtn_layers[name]
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 2 ** layer.w_bits - 1
        expected = P.dequantize_tensor(codes, layer.expand(layer.weight_scale),
                                       layer.expand(layer.weight_zero_point), layer.weight.dtype)
        assert torch.equal(layer.weight, expected), name
        assert torch.equal(layer.weight_scale, reference.weight_scale), "the RTN grid must be kept"
        assert torch.equal(layer.weight_zero_point, reference.weight_zero_point)
        step = codes.int() - reference.weight_codes.int()
        assert step.abs().max() <= 1, "learned rounding only chooses between floor and ceil"
        changed += int(step.ne(0).sum())
    assert changed > 0


def test_same_seed_is_bit_identical(unet: UNet2DModel, calibration: tacdiff.CalibrationSet) -> None:
    config, data = adaround_config(adaround_iters=5), calibration.subset(16)
    first, second = (tacdiff.quantize(copy.deepcopy(unet), config, data, progress=False).state_dict()
                     for _ in range(2))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_learns_under_no_grad_as_it_does_outside(unet: UNet2DModel, calibration: tacdiff.CalibrationSet) -> None:
    config, data = adaround_config(adaround_iters=5), calibration.subset(16)
    with torch.no_grad():  # as in the benchmark, which samples under no_grad
        inside = tacdiff.quantize(copy.deepcopy(unet), config, data, progress=False).state_dict()
    outside = tacdiff.quantize(copy.deepcopy(unet), config, data, progress=False).state_dict()
    assert all(torch.equal(inside[k], outside[k]) for k in outside)


def test_soft_weight_starts_at_the_float_weight() -> None:
    torch.manual_seed(0)
    float_layer = nn.Linear(16, 8)
    layer = QuantLinear.from_float(float_layer, 4, False, None, None)
    layer.quantize_weight("minmax")
    soft = adaround._SoftRounding(layer, float_layer.weight.detach())
    scale, zero_point = layer.expand(layer.weight_scale), layer.expand(layer.weight_zero_point)
    on_grid = scale * (torch.clamp(float_layer.weight.detach() / scale + zero_point, 0, 15) - zero_point)
    torch.testing.assert_close(soft.soft_weight(), on_grid, atol=1e-6, rtol=0)
    assert torch.equal(soft.hard_codes(), layer.weight_codes.float()), "untrained rounding is round-to-nearest"


def test_conditional_unet_with_activation_quantization() -> None:
    unet = tiny_model("cond_unet", sample_size=8, layers_per_block=1)
    text = torch.randn(8, 7, 32)
    calibration = calibration_of(unet, seed=0, cond={"encoder_hidden_states": text})
    model = tacdiff.quantize(copy.deepcopy(unet), adaround_config(act_bits=8, adaround_iters=10),
                             calibration, progress=False)
    units = dict(reconstruction_units(model))
    assert any(isinstance(u, BasicTransformerBlock) for u in units.values())
    assert not any(isinstance(u, Attention) for u in units.values()), "attention sits inside transformer blocks"
    assert all(q.enabled for q in model.modules() if isinstance(q, ActQuantizer))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules() if m is not model)
    assert all(p.grad is None for p in model.parameters())
    x, t, cond = next(calibration.batches(8))
    with torch.no_grad():
        out, ref = model(x, t, **cond).sample, unet(x, t, **cond).sample
    assert torch.isfinite(out).all()
    assert (out - ref).pow(2).mean() < 0.1 * ref.pow(2).mean()
