"""Transformer denoisers (tiny real DiT, PixArt and SD3 MMDiT) through quantize -> TAC calibration -> sampling,
and flow matching through the sampling loop."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, SchedulerMixin
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from torch import nn

import tacdiff
from tacdiff.correction import CorrectedDenoiser, CorrectionTables, calibrate_tac
from tacdiff.models.kinds import FLOW, ModelDenoiser, correction_space, prediction_type
from tacdiff.models.loading import build_scheduler, load_any_model, resolve_scheduler
from tacdiff.quant import format_summary, quantization_summary
from tacdiff.quant.attention import QuantAttnProcessor, QuantJointAttnProcessor
from tacdiff.sampling import batched_trajectories, sample, sample_noise

from tiny_models import tiny_cond, tiny_model, with_quant_processors

STEPS, SAMPLES = 5, 8
SCHEDULERS = {"dit": DDIMScheduler, "pixart": DDIMScheduler, "sd3": FlowMatchEulerDiscreteScheduler}


def _scheduler(name: str) -> SchedulerMixin:
    return SCHEDULERS[name]() if SCHEDULERS[name] is FlowMatchEulerDiscreteScheduler else \
        DDIMScheduler.from_config(DDPMScheduler().config)


@pytest.fixture(scope="module", params=sorted(SCHEDULERS))
def fitted(request: pytest.FixtureRequest) -> tuple[str, nn.Module, nn.Module, CorrectionTables]:
    """``(name, fp, W4A8 copy, TAC tables)`` of one tiny transformer, calibrated on its own trajectories."""
    name = request.param
    fp, scheduler = tiny_model(name), _scheduler(name)
    cond = tiny_cond(name, SAMPLES, seed=0)
    inputs = tacdiff.collect_calibration_set(fp, scheduler, num_samples=SAMPLES, num_inference_steps=STEPS,
                                             kept_steps=STEPS, cond=cond, progress=False)
    quant = tacdiff.quantize(copy.deepcopy(fp), tacdiff.QuantConfig(weight_bits=4, act_bits=8), inputs,
                             progress=False)
    tables = calibrate_tac(fp, quant, scheduler, num_inference_steps=STEPS, num_samples=SAMPLES, batch_size=4,
                           cond=cond, progress=False)
    return name, fp, quant, tables


def test_every_linear_layer_of_a_transformer_is_quantized(fitted: tuple) -> None:
    name, _, quant, _ = fitted
    rows = quantization_summary(quant)
    linears = [row for row in rows if row["kind"] == "linear"]
    assert linears and all(row["weight_bits"] in (4, 8) for row in linears)
    names = {row["name"] for row in linears}
    if name == "dit":  # adaLN modulation, time/label embeddings, the patch embedding (a conv) and the output
        assert any("norm1.linear" in n for n in names) and any("timestep_embedder" in n for n in names)
        assert any(row["name"] == "pos_embed.proj" for row in rows)


def test_attention_matmuls_are_quantized_joint_attention_too(fitted: tuple) -> None:
    name, fp, quant, _ = fitted
    processors = {type(m.processor) for m in quant.modules() if hasattr(m, "processor")}
    assert processors == ({QuantJointAttnProcessor} if name == "sd3" else {QuantAttnProcessor})
    attentions = [row for row in quantization_summary(quant) if row["kind"] == "attention"]
    assert len(attentions) == sum(hasattr(m, "processor") for m in fp.modules())
    assert "kept float" not in format_summary(quant)


@torch.no_grad()
def test_the_joint_processor_equals_diffusers_with_quantizers_off() -> None:
    """SD3's joint attention (QK-norms, a dual-attention block whose second attention sees image tokens only, a
    last block whose text stream ends at the attention) recomputed eagerly: the same outputs."""
    fp = tiny_model("sd3", num_layers=2, qk_norm="rms_norm", dual_attention_layers=(0,))
    model = with_quant_processors(fp)
    assert {type(m.processor) for m in model.modules() if isinstance(m, Attention)} == {QuantJointAttnProcessor}
    x, cond = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), tiny_cond("sd3", 2, seed=1)
    t = torch.tensor([300.0, 300.0])
    torch.testing.assert_close(model(x, timestep=t, **cond).sample, fp(x, timestep=t, **cond).sample,
                               rtol=1e-4, atol=1e-5)


class OwnJointProcessor(JointAttnProcessor2_0):
    """A user's own processor: tacdiff cannot know what it computes."""


def test_a_processor_tacdiff_cannot_reproduce_stays_float() -> None:
    fp = tiny_model("sd3", num_layers=2)
    fp.transformer_blocks[1].attn.set_processor(OwnJointProcessor())
    cond = tiny_cond("sd3", 4, seed=0)
    inputs = tacdiff.collect_calibration_set(fp, _scheduler("sd3"), num_samples=4, num_inference_steps=3,
                                             kept_steps=3, cond=cond, progress=False)
    quant = tacdiff.quantize(copy.deepcopy(fp), tacdiff.QuantConfig(weight_bits=8, act_bits=8), inputs,
                             progress=False)
    assert isinstance(quant.transformer_blocks[1].attn.processor, OwnJointProcessor)
    assert isinstance(quant.transformer_blocks[0].attn.processor, QuantJointAttnProcessor)
    assert "kept float (a processor tacdiff does not reproduce): transformer_blocks.1.attn (OwnJointProcessor)" \
        in format_summary(quant)


def test_tables_record_the_parameterization_and_refuse_another(fitted: tuple) -> None:
    name, _, _, tables = fitted
    scheduler = _scheduler(name)
    assert tables.metadata["prediction"] == correction_space(scheduler) == ("flow" if name == "sd3" else "epsilon")
    other = DDIMScheduler() if name == "sd3" else FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="predictions, but under"):
        tables.check_prediction(other)
    tables.check_prediction(scheduler)


def test_corrected_transformer_samples_are_finite_and_corrected(fitted: tuple) -> None:
    name, fp, quant, tables = fitted
    scheduler = _scheduler(name)
    denoisers = [ModelDenoiser(fp, scheduler), ModelDenoiser(quant, scheduler),
                 CorrectedDenoiser(ModelDenoiser(quant, scheduler), tables)]
    (_, finals), = batched_trajectories(denoisers, scheduler, num_samples=4, sample_shape=(4, 8, 8),
                                       num_inference_steps=STEPS, seed=9, batch_size=4,
                                       cond=tiny_cond(name, 4, seed=9), progress=False)
    assert all(bool(torch.isfinite(x).all()) for x in finals)
    assert finals[0].shape == (4, 4, 8, 8)  # the learned-variance half is split off before the correction
    assert not torch.equal(finals[1], finals[2])


def test_flow_matching_samples_as_diffusers_does() -> None:
    """tacdiff's loop on a flow-matching scheduler equals diffusers' own Euler loop over sigmas."""
    model, scheduler = tiny_model("sd3"), FlowMatchEulerDiscreteScheduler(shift=3.0)
    cond = tiny_cond("sd3", 2, seed=1)
    noise = sample_noise((4, 8, 8), 0, 2, seed=1)
    assert prediction_type(scheduler) == FLOW
    ours = sample(ModelDenoiser(model, scheduler), scheduler, noise, num_inference_steps=STEPS, cond=cond,
                  progress=False)
    reference = copy.deepcopy(scheduler)
    reference.set_timesteps(STEPS)
    x = noise.clone()
    with torch.no_grad():
        for t in reference.timesteps:
            velocity = model(x, timestep=t.expand(2), **cond, return_dict=False)[0]
            x = reference.step(velocity, t, x, return_dict=False)[0]
    assert torch.equal(ours, x)


@pytest.mark.parametrize("config, name", [({"shift": 3.0, "beta_start": 0.1}, "flow"), ({"shift": 3.0}, "ddim"),
                                          ({"shift": 1.0, "use_dynamic_shifting": True}, "flow")])
def test_schedulers_that_do_not_fit_a_flow_model_are_refused_by_name(config: dict[str, object], name: str) -> None:
    """A noise scheduler for a flow model, flow matching for a beta schedule, and run-time sigma shifting (FLUX)."""
    base = dict(FlowMatchEulerDiscreteScheduler(**{k: v for k, v in config.items() if k != "beta_start"}).config)
    with pytest.raises(ValueError, match="use_dynamic_shifting|does not fit this model"):
        build_scheduler(name, {**base, **config})
    if not config.get("use_dynamic_shifting") and "beta_start" not in config:
        assert type(build_scheduler("auto", base)) is FlowMatchEulerDiscreteScheduler


@pytest.mark.parametrize("name, expected", [("sd3", "flow"), ("dit", "ddim"), ("pixart", "ddim")])
def test_a_bare_transformer_folder_gets_the_schedule_it_was_trained_for(tmp_path, name: str, expected: str) -> None:
    """No scheduler config beside the model: SD3's transformer samples by flow matching (shift 3.0), others DDPM."""
    tiny_model(name).save_pretrained(tmp_path / name)
    config = load_any_model(tmp_path / name).scheduler_config
    assert resolve_scheduler("auto", config) == expected
    assert config.get("shift", 3.0) == 3.0
