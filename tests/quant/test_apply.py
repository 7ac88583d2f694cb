"""The walker on tiny real UNets: output quality, which modules get swapped, splits, timestep groups, errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0
from safetensors.torch import load_file
from torch import nn

import tacdiff
from tacdiff.io import load_quantized, save_quantized
from tacdiff.io.artifact import WEIGHTS_NAME
from tacdiff.quant import QuantConfig, format_summary, plan_layers, quant_state, quantization_summary
from tacdiff.quant.apply import quantize_weights_only, skip_concat_splits
from tacdiff.quant.attention import MATMUL_OPERANDS, QuantAttnProcessor
from tacdiff.quant.layers import ActQuantizer, QuantConv2d, QuantEmbedding, QuantLinear
from tiny_models import (calibration_of, outputs, quantized_copy, sqnr_db, tiny_cond, tiny_model,
                         with_quant_processors)

# Floors below what the tiny random-weight models give (see benchmarks/results/act_noise_budget.md).
# Calibrated (mse) ranges: W8A8 held-out SQNR 28.7 dB (UNet2DModel) and 26.5 dB (UNet2DConditionModel)
# overall, at least 27.9 / 25.3 dB at every timestep (4 timestep groups: 29.4 / 26.5 dB overall).
# Dynamic ranges (per token for linears and 1x1 convs, per sample elsewhere): 31.3 / 29.6 dB overall,
# at least 30.1 / 28.2 dB at every timestep; with GPTQ-rounded weights 31.8 / 29.9 dB, at least 30.8 / 28.6.
# Block-scaled dynamic ranges (per token and block of 32 channels in every conv and linear input):
# 34.5 / 32.4 dB overall, at least 33.6 / 31.3 dB at every timestep (act_noise_budget.md).
MODELS = {
    "unet": ("unet", "w8a8", "held_out", 26.0, 25.0),
    "cond_unet": ("cond_unet", "cond_w8a8", "cond_held_out", 24.0, 23.0),
    "unet_dynamic": ("unet", "w8a8_dynamic", "held_out", 30.0, 29.0),
    "cond_unet_dynamic": ("cond_unet", "cond_w8a8_dynamic", "cond_held_out", 29.0, 27.5),
    "unet_dynamic_gptq": ("unet", "w8a8_dynamic_gptq", "held_out", 31.0, 30.0),
    "cond_unet_dynamic_gptq": ("cond_unet", "cond_w8a8_dynamic_gptq", "cond_held_out", 29.5, 28.0),
    "unet_blocked": ("unet", "w8a8_blocked", "held_out", 33.5, 32.5),
    "cond_unet_blocked": ("cond_unet", "cond_w8a8_blocked", "cond_held_out", 31.5, 30.5),
}
QUANTIZED = ["w8a8", "cond_w8a8", "w8a8_dynamic"]
FP_OF = {"w8a8": "unet", "cond_w8a8": "cond_unet", "w8a8_grouped": "unet", "cond_w8a8_grouped": "cond_unet",
         "w8a8_dynamic": "unet"}


def per_timestep_sqnr(reference: torch.Tensor, approximation: torch.Tensor, data: tacdiff.CalibrationSet
                      ) -> dict[int, float]:
    return {int(t): sqnr_db(reference[data.timesteps == t], approximation[data.timesteps == t])
            for t in torch.unique(data.timesteps)}


@pytest.mark.parametrize("which", list(MODELS))
def test_w8a8_output_sqnr_on_held_out_inputs(which: str, request: pytest.FixtureRequest) -> None:
    fp_name, q_name, data_name, floor, step_floor = MODELS[which]
    fp, quantized, data = (request.getfixturevalue(n) for n in (fp_name, q_name, data_name))
    reference, approximation = outputs(fp, data), outputs(quantized, data)
    assert sqnr_db(reference, approximation) > floor
    per_step = per_timestep_sqnr(reference, approximation, data)
    assert len(per_step) == 8 and min(per_step.values()) > step_floor, per_step


@pytest.mark.parametrize("which", ["w8a8_grouped", "cond_w8a8_grouped"])
def test_timestep_grouped_ranges_keep_the_sqnr(which: str, request: pytest.FixtureRequest) -> None:
    fp = request.getfixturevalue(FP_OF[which])
    data = request.getfixturevalue("held_out" if fp.__class__.__name__ == "UNet2DModel" else "cond_held_out")
    floor = 26.0 if which == "w8a8_grouped" else 24.0
    assert sqnr_db(outputs(fp, data), outputs(request.getfixturevalue(which), data)) > floor


def test_w4a8_is_worse_than_w8a8_at_every_timestep(unet: nn.Module, w8a8: nn.Module, w4a8: nn.Module,
                                                  held_out: tacdiff.CalibrationSet) -> None:
    reference = outputs(unet, held_out)
    eight = per_timestep_sqnr(reference, outputs(w8a8, held_out), held_out)
    four = per_timestep_sqnr(reference, outputs(w4a8, held_out), held_out)
    assert all(four[t] < eight[t] - 6.0 for t in eight), (four, eight)
    assert min(four.values()) > 8.0, "4-bit weights must still track the model"


@pytest.mark.parametrize("name", QUANTIZED)
def test_every_conv_and_linear_is_swapped(name: str, request: pytest.FixtureRequest) -> None:
    fp, quantized = request.getfixturevalue(FP_OF[name]), request.getfixturevalue(name)
    float_layers = {n for n, m in fp.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    modules = dict(quantized.named_modules())
    assert not [n for n, m in modules.items() if type(m) in (nn.Conv2d, nn.Linear)]
    swapped = {n for n, m in modules.items() if isinstance(m, (QuantConv2d, QuantLinear))}
    assert swapped == float_layers
    assert {"time_embedding.linear_1", "time_embedding.linear_2", "conv_in", "conv_out"} <= swapped
    projections = {n for n in swapped if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0")}
    assert len(projections) == 4 * sum(isinstance(m, Attention) for m in modules.values())
    for n in swapped:
        layer, original = modules[n], fp.get_submodule(n)
        assert type(layer).__name__ == f"Quant{type(original).__name__}"
        assert (layer.act_quant is None) == (n == "conv_in"), n
        assert layer.act_quant is None or layer.act_quant.enabled, f"{n} was not calibrated"


@pytest.mark.parametrize("name", QUANTIZED)
def test_attention_modules_quantize_their_matmul_operands(name: str, request: pytest.FixtureRequest) -> None:
    quantized = request.getfixturevalue(name)
    attentions = [m for m in quantized.modules() if isinstance(m, Attention)]
    assert attentions
    calls = []
    handles = []
    for attn in attentions:
        assert isinstance(attn.processor, QuantAttnProcessor)
        for operand in MATMUL_OPERANDS:
            quantizer = getattr(attn, operand)
            assert isinstance(quantizer, ActQuantizer) and quantizer.enabled and quantizer.bits == 8
            handles.append(quantizer.register_forward_hook(
                lambda m, a, out: calls.append(max(head.unique().numel() for head in out))))
    x = torch.randn(1, quantized.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = {"encoder_hidden_states": torch.randn(1, 7, 32)} if "cond" in name else {}
    with torch.no_grad():
        quantized(x, torch.tensor([500]), **cond)
    for handle in handles:
        handle.remove()
    assert len(calls) == 4 * len(attentions), "every operand quantizer runs once per forward"
    assert max(calls) <= 256, "operands are on an 8-bit grid (dynamic ranges: one per sample and head)"


@pytest.mark.parametrize("which", ["unet", "cond_unet"])
def test_quant_processor_equals_diffusers_attention_with_quantizers_off(which: str,
                                                                         request: pytest.FixtureRequest) -> None:
    fp = request.getfixturevalue(which)
    model = with_quant_processors(fp)
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, fp.config.in_channels, 16, 16, generator=generator)
    cond = {"encoder_hidden_states": torch.randn(2, 7, 32, generator=generator)} if which == "cond_unet" else {}
    with torch.no_grad():
        torch.testing.assert_close(model(x, torch.tensor([300, 300]), **cond).sample,
                                   fp(x, torch.tensor([300, 300]), **cond).sample, rtol=1e-4, atol=1e-5)


def test_first_and_last_layers_stay_at_eight_bits(w4a8: nn.Module) -> None:
    layers = {n: m for n, m in w4a8.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    assert layers["conv_in"].w_bits == 8 and layers["conv_in"].act_quant is None, "x_t stays float by default"
    assert layers["conv_out"].w_bits == 8 and layers["conv_out"].act_quant.bits == 8
    assert {m.w_bits for n, m in layers.items() if n not in ("conv_in", "conv_out")} == {4}


def test_plan_bits_for_the_edges(unet: nn.Module) -> None:
    plan = {p.name: p for p in plan_layers(unet, QuantConfig(weight_bits=4, act_bits=6))}
    assert (plan["conv_in"].weight_bits, plan["conv_in"].act_bits) == (8, None)
    assert (plan["conv_out"].weight_bits, plan["conv_out"].act_bits) == (8, 8)
    inner = [p for n, p in plan.items() if n not in ("conv_in", "conv_out")]
    assert {p.act_bits for p in inner} == {6} and {p.weight_bits for p in inner if p.kind != "attention"} == {4}
    with_input = {p.name: p for p in plan_layers(unet, QuantConfig(weight_bits=4, act_bits=6,
                                                                   quantize_model_input=True))}
    assert with_input["conv_in"].act_bits == 8
    uniform = {p.name: p for p in plan_layers(unet, QuantConfig(weight_bits=4, act_bits=6, first_last_bits=None))}
    assert (uniform["conv_out"].weight_bits, uniform["conv_out"].act_bits) == (4, 6)
    weight_only = plan_layers(unet, QuantConfig(weight_bits=4, act_bits=None))
    assert all(p.act_bits is None and p.kind != "attention" for p in weight_only)
    assert not [p for p in plan_layers(unet, QuantConfig(quantize_attention_matmuls=False)) if p.kind == "attention"]


def test_exclude_patterns_leave_modules_in_full_precision(unet: nn.Module) -> None:
    patterns = ("time_embedding.*", "up_blocks.0.attentions.*", "conv_out")
    model = quantized_copy(unet, None, weight_bits=4, act_bits=None, exclude=patterns)
    excluded = [n for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                and (n.startswith(("time_embedding.", "up_blocks.0.attentions.")) or n == "conv_out")]
    assert len(excluded) == 2 + 2 * 4 + 1
    for n in excluded:
        module = model.get_submodule(n)
        assert type(module) in (nn.Conv2d, nn.Linear), n
        assert torch.equal(module.weight, unet.get_submodule(n).weight)
    assert isinstance(model.get_submodule("up_blocks.1.resnets.0.conv1"), QuantConv2d)
    plan = {p.name for p in plan_layers(unet, QuantConfig(exclude=patterns))}
    assert "up_blocks.0.attentions.0" not in plan and "mid_block.attentions.0" in plan
    assert not plan & set(excluded)


def test_quantizers_that_see_no_data_are_named_in_one_warning(unet: nn.Module,
                                                            calibration: tacdiff.CalibrationSet) -> None:
    model = copy.deepcopy(unet)
    model.spare = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))  # never called by the forward pass
    with pytest.warns(UserWarning, match="2 activation quantizers saw no calibration data") as record:
        tacdiff.quantize(model, QuantConfig(act_range="minmax"), calibration, progress=False)
    messages = [str(w.message) for w in record if "saw no calibration data" in str(w.message)]
    assert len(messages) == 1 and "spare.0" in messages[0] and "spare.1" in messages[0]
    assert not model.spare[0].act_quant.enabled


def observed_skip_splits(model: nn.Module, data: tacdiff.CalibrationSet) -> dict[str, int]:
    """Channel index where each up-block resnet's input switches to the skip tensor, seen in a real forward.

    The skip tensors are the ``res_hidden_states_tuple`` handed to each up block; a resnet's
    input must end with its skip tensor, value for value.
    """
    skips: dict[int, tuple[torch.Tensor, ...]] = {}
    found: dict[str, int] = {}
    handles = []
    for b, block in enumerate(model.up_blocks):
        def grab(module: nn.Module, args: tuple, kwargs: dict, b: int = b) -> None:
            skips[b] = kwargs["res_hidden_states_tuple"] if "res_hidden_states_tuple" in kwargs else args[1]
        handles.append(block.register_forward_pre_hook(grab, with_kwargs=True))
        for j, resnet in enumerate(block.resnets):
            def check(module: nn.Module, args: tuple, b: int = b, j: int = j) -> None:
                joined, skip = args[0], skips[b][-1 - j]
                split = joined.shape[1] - skip.shape[1]
                assert split > 0 and torch.equal(joined[:, split:], skip)
                for conv in ("conv1", "conv_shortcut"):
                    if getattr(module, conv, None) is not None:
                        found[f"up_blocks.{b}.resnets.{j}.{conv}"] = split
            handles.append(resnet.register_forward_pre_hook(check))
    x, t, cond = next(data.batches(2))
    try:
        with torch.no_grad():
            model(x, t, **cond)
    finally:
        for handle in handles:
            handle.remove()
    return found


@pytest.mark.parametrize("name", QUANTIZED)
def test_skip_concat_splits_match_the_real_concatenations(name: str, request: pytest.FixtureRequest) -> None:
    fp, quantized = request.getfixturevalue(FP_OF[name]), request.getfixturevalue(name)
    data = request.getfixturevalue("calibration" if FP_OF[name] == "unet" else "cond_calibration")
    observed = observed_skip_splits(fp, data)
    n_resnets = sum(len(block.resnets) for block in fp.up_blocks)
    assert len({k.rsplit(".", 1)[0] for k in observed}) == n_resnets
    assert any(k.endswith("conv_shortcut") for k in observed) and any(k.endswith("conv1") for k in observed)
    assert skip_concat_splits(fp) == observed
    for layer_name, split in observed.items():
        layer = quantized.get_submodule(layer_name)
        assert layer.split == split and layer.act_quant.split == split, layer_name
        assert layer.weight_scale.shape == (layer.weight.shape[0], 2)
    planned = {p.name: p.split for p in quant_state(quantized).plan if p.split is not None}
    assert planned == observed
    unsplit = {p.name: p.split for p in plan_layers(fp, QuantConfig(split_shortcut=False))}
    assert all(split is None for split in unsplit.values())


def test_four_timestep_groups_hold_four_different_ranges(w8a8_grouped: nn.Module) -> None:
    quantizers = [m for m in w8a8_grouped.modules() if isinstance(m, ActQuantizer)]
    assert quantizers and all(q.enabled and q.scale.shape[0] == 4 for q in quantizers)
    for q in quantizers:
        rows = {tuple(r.tolist()) for r in torch.cat([q.scale, q.zero_point], dim=1)}
        assert len(rows) == 4, f"{q.name} has only {len(rows)} distinct group ranges"


def test_each_timestep_uses_its_own_group_range(w8a8_grouped: nn.Module, held_out: tacdiff.CalibrationSet) -> None:
    quantizer = w8a8_grouped.conv_out.act_quant
    saved = quantizer.scale.clone()
    before = outputs(w8a8_grouped, held_out)
    try:
        quantizer.scale[1] *= 4  # coarsen group 1 (t in [250, 500)) only
        after = outputs(w8a8_grouped, held_out)
    finally:
        quantizer.scale.copy_(saved)
    in_group = (held_out.timesteps >= 250) & (held_out.timesteps < 500)
    assert in_group.any() and (~in_group).any()
    assert torch.equal(after[~in_group], before[~in_group])
    assert not torch.equal(after[in_group], before[in_group])


def test_a_batch_mixing_timestep_groups_raises(w8a8_grouped: nn.Module, held_out: tacdiff.CalibrationSet) -> None:
    with torch.no_grad(), pytest.raises(ValueError, match="mixes timesteps"):
        w8a8_grouped(held_out.x[:2], torch.tensor([100.0, 900.0]))


def test_a_deep_copy_routes_its_own_timestep_groups(w8a8_grouped: nn.Module,
                                                    held_out: tacdiff.CalibrationSet) -> None:
    clone = copy.deepcopy(w8a8_grouped)
    assert torch.equal(outputs(clone, held_out), outputs(w8a8_grouped, held_out))


def test_dynamic_ranges_serve_a_batch_mixing_timesteps(w8a8_dynamic: nn.Module,
                                                        held_out: tacdiff.CalibrationSet) -> None:
    x, t = held_out.x[:3].clone(), torch.tensor([100.0, 500.0, 900.0])
    x[2] *= 100
    with torch.no_grad():
        together = w8a8_dynamic(x, t).sample
        alone = torch.cat([w8a8_dynamic(x[i:i + 1], t[i:i + 1]).sample for i in range(3)])
    # Not bit-equal: batch size changes float rounding in the convolutions, which flips a few
    # activation codes (calibrated ranges do the same). A range shared across the batch would
    # put the 100x larger third sample's step on the other two and fail here.
    assert sqnr_db(alone[:2], together[:2]) > 32.0


@pytest.mark.parametrize("name, block, wide_conv_token_dim", [("cond_w8a8_dynamic", None, None),
                                                              ("cond_w8a8_blocked", 32, 1)])
def test_dynamic_ranges_are_per_token_exactly_where_the_integer_matmul_allows(
        name: str, block: int | None, wide_conv_token_dim: int | None, cond_w8a8: nn.Module,
        request: pytest.FixtureRequest) -> None:
    """A plain int8 matmul rescales output rows (linears, 1x1 convs); a block-scaled one also 3x3 convs."""
    model = request.getfixturevalue(name)
    expected = {nn.Linear: -1, (1, 1): 1, (3, 3): wide_conv_token_dim}
    layers = [m for m in model.modules() if isinstance(m, (QuantConv2d, QuantLinear)) and m.act_quant]
    for layer in layers:
        key = nn.Linear if isinstance(layer, nn.Linear) else layer.kernel_size
        assert layer.act_quant.token_dim == expected[key], layer.act_quant.name
        assert layer.act_quant.block_size == block
    assert {type(m) for m in layers} == {QuantConv2d, QuantLinear}
    assert {m.kernel_size for m in layers if isinstance(m, nn.Conv2d)} == {(1, 1), (3, 3)}
    attentions = [a for a in model.modules() if isinstance(a, Attention)]
    operands = [getattr(a, op) for a in attentions for op in MATMUL_OPERANDS]
    assert operands and all(q.dynamic and q.token_dim is None for q in operands), "per sample and head"
    assert all(q.token_dim is None for q in cond_w8a8.modules() if isinstance(q, ActQuantizer)), "calibrated ranges"


@pytest.mark.parametrize("prefix, fp_name, data_name", [("", "unet", "held_out"),
                                                        ("cond_", "cond_unet", "cond_held_out")])
def test_finer_ranges_beat_coarser_ones_on_both_unets(prefix: str, fp_name: str, data_name: str,
                                                      request: pytest.FixtureRequest) -> None:
    """Calibrated per-tensor < dynamic per sample or token < block-scaled per token block, by over 1 dB each."""
    fp, data = request.getfixturevalue(fp_name), request.getfixturevalue(data_name)
    reference = outputs(fp, data)
    static, dynamic, blocked = (sqnr_db(reference, outputs(request.getfixturevalue(prefix + name), data))
                                for name in ("w8a8", "w8a8_dynamic", "w8a8_blocked"))
    assert static + 1.0 < dynamic and dynamic + 1.0 < blocked


def test_attention_with_its_own_processor_keeps_it_and_float_matmuls() -> None:
    """SimpleCrossAttn blocks add key/value projections of the text that the plain processor lacks."""
    model = tiny_model("added_kv_unet")
    cond = tiny_cond("added_kv_unet", 4, seed=0)
    data = calibration_of(model, seed=0, num_samples=4, cond=cond)
    quantized = quantized_copy(model, None, weight_bits=8, act_bits=8, act_range="dynamic")
    attentions = [m for m in quantized.modules() if isinstance(m, Attention)]
    assert attentions and all(type(a.processor) is AttnAddedKVProcessor2_0 for a in attentions)
    assert not any(hasattr(a, "q_quant") for a in attentions)
    assert isinstance(attentions[0].add_k_proj, QuantLinear), "its projections are still quantized"
    assert sqnr_db(outputs(model, data), outputs(quantized, data)) > 25.0


@pytest.mark.parametrize("rounding", ["rtn", "gptq", "adaround"])
def test_integer_class_labels_reach_a_class_conditional_unet_as_integers(rounding: str) -> None:
    model = tiny_model("class_unet")
    data = calibration_of(model, seed=0, num_samples=4, num_inference_steps=2, kept_steps=2,
                          cond={"class_labels": torch.tensor([1, 2, 3, 4])})
    quantized = quantized_copy(model, data, weight_bits=8, act_bits=8, weight_rounding=rounding, adaround_iters=2)
    assert sqnr_db(outputs(model, data), outputs(quantized, data)) > 25.0


@pytest.mark.parametrize("rounding", ["rtn", "gptq"])
def test_embedding_tables_quantize_weight_only_when_asked(rounding: str, tmp_path: Path) -> None:
    """Each DiT block's class-embedding table: 4-bit codes per row, no activation quantizer, a smaller artifact
    that reloads bit for bit; off by default."""
    model = tiny_model("dit", out_channels=4)  # no learned variance: outputs() compares the whole output
    data = calibration_of(model, seed=0, num_samples=4, num_inference_steps=2, kept_steps=2,
                          cond=tiny_cond("dit", 4, seed=0))
    sizes = {}
    for tables in (False, True):
        quantized = quantized_copy(model, data, weight_bits=4, act_bits=8, weight_rounding=rounding,
                                   quantize_embeddings=tables)
        embeddings = [m for m in quantized.modules() if isinstance(m, QuantEmbedding)]
        assert len(embeddings) == (2 if tables else 0)
        for table in embeddings:
            assert table.act_quant is None and int(table.weight_codes.max()) < 16
            assert all(len(row.unique()) <= 16 for row in table.weight), "each row is its own 4-bit grid"
        assert sqnr_db(outputs(model, data), outputs(quantized, data)) > 10.0
        save_quantized(quantized, tmp_path / str(tables))
        stored = load_file(tmp_path / str(tables) / WEIGHTS_NAME)
        sizes[tables] = sum(t.numel() * t.element_size() for t in stored.values())
        reloaded = load_quantized(tmp_path / str(tables))
        assert torch.equal(outputs(quantized, data), outputs(reloaded, data))
    assert "embedding" in format_summary(quantized)
    table_bytes = sum(m.weight.numel() for m in embeddings) * 4
    assert sizes[False] - sizes[True] > 0.5 * table_bytes  # fp32 rows -> 4-bit codes and a scale and zero per row


def test_a_tied_embedding_table_stays_float() -> None:
    model = tiny_model("dit")
    first, second = (f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table" for i in (0, 1))
    model.set_submodule(second, model.get_submodule(first))
    names = [entry.name for entry in plan_layers(model, QuantConfig(quantize_embeddings=True))
             if entry.kind == "embedding"]
    assert names == []


def test_excluding_every_layer_raises(unet: nn.Module) -> None:
    with pytest.raises(ValueError, match="nothing left to quantize"):
        tacdiff.quantize(copy.deepcopy(unet), QuantConfig(act_bits=None, exclude=("*",)), progress=False)


def test_exclude_pattern_matching_nothing_raises(unet: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"exclude pattern 'up_block.\*' matches no module.*'conv_in' or '\w"):
        plan_layers(unet, QuantConfig(exclude=("conv_out", "up_block.*")))


def test_quantizing_twice_raises(unet: nn.Module) -> None:
    model = quantized_copy(unet, None, weight_bits=8, act_bits=None)
    with pytest.raises(ValueError, match="already quantized"):
        tacdiff.quantize(model, QuantConfig(act_bits=None), progress=False)


@pytest.mark.parametrize("model", [nn.Sequential(nn.Conv2d(3, 3, 1)), nn.Linear(2, 2)])
def test_models_other_than_diffusers_unets_raise_type_error(model: nn.Module) -> None:
    with pytest.raises(TypeError, match="UNet2DModel"):
        tacdiff.quantize(model, QuantConfig(act_bits=None), progress=False)


@pytest.mark.parametrize("config, message", [
    (QuantConfig(act_bits=8), "activation ranges need calibration inputs.*act_range='dynamic'"),
    (QuantConfig(act_bits=None, weight_rounding="adaround"), "learned rounding needs calibration inputs"),
    (QuantConfig(act_range="dynamic", weight_rounding="adaround"), "learned rounding needs calibration inputs"),
    (QuantConfig(act_range="dynamic", weight_rounding="gptq"), "GPTQ rounding needs calibration inputs"),
])
def test_missing_calibration_raises(unet: nn.Module, config: QuantConfig, message: str) -> None:
    model = copy.deepcopy(unet)
    with pytest.raises(ValueError, match=message):
        tacdiff.quantize(model, config, None, progress=False)
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules()), "checked before any change"


def test_nan_in_calibration_inputs_raises(unet: nn.Module, calibration: tacdiff.CalibrationSet) -> None:
    small = calibration.subset(8)
    x = small.x.clone()
    x[3, 0, 5, 5] = float("nan")
    poisoned = tacdiff.CalibrationSet(x, small.timesteps, small.cond)
    with pytest.raises(ValueError, match="NaN or inf"):
        tacdiff.quantize(tiny_model("unet"), QuantConfig(), poisoned, progress=False)


def test_a_failed_quantize_leaves_the_model_full_precision(unet: nn.Module, calibration: tacdiff.CalibrationSet,
                                                           held_out: tacdiff.CalibrationSet) -> None:
    model = copy.deepcopy(unet)
    processors = {n: type(m.processor) for n, m in model.named_modules() if isinstance(m, Attention)}
    x = calibration.x.clone()
    x[-1, 0, 0, 0] = float("inf")  # the last batch fails, after weights are quantized and ranges observed
    with pytest.raises(ValueError, match="NaN or inf"):
        tacdiff.quantize(model, QuantConfig(), tacdiff.CalibrationSet(x, calibration.timesteps, {}), batch_size=16,
                         progress=False)
    assert not any(isinstance(m, (QuantConv2d, QuantLinear, ActQuantizer)) for m in model.modules())
    assert {n: type(m.processor) for n, m in model.named_modules() if isinstance(m, Attention)} == processors
    assert not model._forward_pre_hooks
    assert torch.equal(outputs(model, held_out), outputs(unet, held_out))
    tacdiff.quantize(model, QuantConfig(), calibration, progress=False)  # and it can be quantized again
    assert quant_state(model).config == QuantConfig()


def test_summary_lists_every_planned_module_and_counts_every_weight(w4a8: nn.Module) -> None:
    rows = quantization_summary(w4a8)
    assert [r["name"] for r in rows] == [p.name for p in quant_state(w4a8).plan]
    text = format_summary(w4a8)
    assert all(r["name"] in text for r in rows)
    edge = w4a8.conv_in.weight.numel() + w4a8.conv_out.weight.numel()
    four = sum(m.weight.numel() for m in w4a8.modules() if isinstance(m, (QuantConv2d, QuantLinear))) - edge
    floats = sum(p.numel() for p in w4a8.parameters()) - edge - four
    assert text.splitlines()[-1] == f"weights: 4-bit {four:,}, 8-bit {edge:,}, float {floats:,}"
    with pytest.raises(ValueError, match="not quantized"):
        quantization_summary(tiny_model("unet"))


def test_weights_only_quantization_serves_any_module_and_refuses_activation_bits() -> None:
    """Pipeline components (here a small MLP standing in for a text encoder) quantize weight-only, without
    timestep routing; activation bits or another rounding raise."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
    x = torch.randn(64, 16)
    reference = module(x).detach()
    for kwargs in ({"act_bits": 8}, {"act_bits": None, "weight_rounding": "gptq"}):
        with pytest.raises(ValueError, match="weight-only"):
            quantize_weights_only(copy.deepcopy(module), tacdiff.QuantConfig(weight_bits=4, **kwargs))
    quantized = quantize_weights_only(copy.deepcopy(module), tacdiff.QuantConfig(weight_bits=4, act_bits=None))
    bits = [m.w_bits for m in quantized.modules() if isinstance(m, QuantLinear)]
    assert bits == [8, 4, 8], "first and last layer at 8 bits, the rest at 4"
    assert quant_state(quantized).hook is None
    assert 15 < sqnr_db(reference, quantized(x).detach()) < 45
