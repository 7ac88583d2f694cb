"""The model-kind registry and denoiser adapters against diffusers' own conventions, on tiny real models."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, SchedulerMixin
from torch import nn

import tacdiff
from tacdiff.correction import calibrate_tac
from tacdiff.models.kinds import (MODEL_KINDS, ClassifierFreeGuidance, DenoiserWrapper, ModelDenoiser, cond_leaves,
                                  example_inputs, kind_of, map_cond, unsupplied_inputs, v_to_eps)
from tacdiff.models.loading import load_any_model
from tacdiff.sampling import run_trajectories, sample_noise

from tiny_models import TINY_MODELS, tiny_cond, tiny_model

STEPS = 4


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_tiny_model_is_a_registered_kind(name: str) -> None:
    model = tiny_model(name)
    assert kind_of(model) is MODEL_KINDS[type(model).__name__]


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_example_inputs_run_every_tiny_model(name: str) -> None:
    """The auto backend's probe and the speed benchmark call each model once on these (SDXL's nested
    ``added_cond_kwargs`` and PixArt's and SD3's text conditioning included)."""
    model = tiny_model(name)
    x, t, cond = example_inputs(model, 3)
    with torch.no_grad():
        out = model(x, timestep=t, **cond).sample
    assert out.shape[0] == 3 and out.shape[2:] == x.shape[2:]


def test_example_inputs_of_a_unet_projecting_its_text() -> None:
    """DeepFloyd IF-style: text embeddings of another width, projected inside the UNet and pooled into the time
    embedding (``addition_embed_type="text"``)."""
    model = tiny_model("cond_unet", addition_embed_type="text", encoder_hid_dim=48, addition_embed_type_num_heads=4)
    x, t, cond = example_inputs(model, 2)
    assert cond["encoder_hidden_states"].shape[-1] == 48
    with torch.no_grad():
        assert model(x, timestep=t, **cond).sample.shape == x.shape


@pytest.mark.parametrize("overrides", [
    {"class_embed_type": "timestep"}, {"class_embed_type": "identity"},
    {"class_embed_type": "projection", "projection_class_embeddings_input_dim": 12},
    {"class_embed_type": "simple_projection", "projection_class_embeddings_input_dim": 12}])
def test_example_inputs_fit_each_class_embedding(overrides: dict) -> None:
    """UNets whose class embedding takes a timestep (e.g. a noise level) or a vector instead of class ids."""
    model = tiny_model("cond_unet", **overrides)
    x, t, cond = example_inputs(model, 2)
    with torch.no_grad():
        assert model(x, timestep=t, **cond).sample.shape == x.shape


@pytest.mark.parametrize("name, overrides, reason", [
    ("cond_unet", {"addition_embed_type": "image", "encoder_hid_dim": 32}, "image embeddings"),
    ("conv_unet", {"class_embed_type": "timestep"}, "class embeddings of type 'timestep'"),
    ("cond_unet", {"in_channels": 7}, "7 input channels for 4 predicted ones"),
    ("cond_unet", {"time_cond_proj_dim": 16}, "a guidance-scale embedding"),
    ("conv_unet", {"time_embedding_type": "fourier"}, "noise levels in place of timesteps")])
def test_models_reading_inputs_tacdiff_cannot_make_are_refused_at_load(tmp_path, name: str, overrides: dict,
                                                                         reason: str) -> None:
    """Kandinsky-style image embeddings, a noise-level class embedding, an upscaler's image channels, LCM's guidance
    embedding, score-SDE noise levels: one clear error before any sampling (diffusers' own would come from deep inside
    the first forward pass, or none at all)."""
    tiny_model(name, **overrides).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=f"reads .*{re.escape(reason)}.*cannot supply"):
        load_any_model(tmp_path / "m")


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_every_tiny_model_has_the_inputs_tacdiff_makes(name: str) -> None:
    assert unsupplied_inputs(tiny_model(name)) is None


def test_example_inputs_name_addition_embeddings_they_cannot_make() -> None:
    kandinsky = tiny_model("cond_unet", addition_embed_type="image", encoder_hid_dim=32)
    with pytest.raises(ValueError, match="'image' addition embeddings"):
        example_inputs(kandinsky, 1)


def test_other_models_are_refused_by_the_registry() -> None:
    with pytest.raises(TypeError, match="tacdiff supports UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel, "
                                        r"PixArtTransformer2DModel, SD3Transformer2DModel; got Conv2d"):
        tacdiff.quantize(nn.Conv2d(3, 3, 1), tacdiff.QuantConfig(act_bits=None), progress=False)
    with pytest.raises(ValueError, match=r"UNet2DModel takes no conditioning \['encoder_hidden_states'\]"):
        ModelDenoiser(tiny_model("conv_unet"))(torch.zeros(1, 3, 8, 8), torch.tensor(10),
                                               encoder_hidden_states=torch.zeros(1, 7, 32))
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        ModelDenoiser(tiny_model("conv_unet"), DDIMScheduler(prediction_type="sample"))


@pytest.mark.parametrize("t", [[10, 500, 999], [3.5, 640.25, 998.75]])
def test_v_to_eps_inverts_diffusers_velocity(t: list[float]) -> None:
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    timesteps = torch.tensor(t, dtype=torch.float64)
    if timesteps.frac().any():  # Euler's sigmas, interpolated between training steps
        euler = EulerDiscreteScheduler()
        sigmas = torch.tensor(((1 - euler.alphas_cumprod) / euler.alphas_cumprod).sqrt().numpy())
        low = timesteps.floor().long()
        sigma = torch.lerp(sigmas[low], sigmas[low + 1], timesteps.frac().float()).view(-1, 1, 1, 1)
        alpha = (1 + sigma ** 2).rsqrt()
        x_t, v = alpha * x0 + sigma * alpha * noise, alpha * noise - sigma * alpha * x0
    else:
        x_t, v = scheduler.add_noise(x0, noise, timesteps.long()), scheduler.get_velocity(x0, noise, timesteps.long())
    torch.testing.assert_close(v_to_eps(v, x_t, timesteps, scheduler.alphas_cumprod), noise, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cls", [DDIMScheduler, EulerDiscreteScheduler], ids=lambda c: c.__name__)
def test_v_prediction_samples_as_diffusers_does(cls: type[SchedulerMixin]) -> None:
    """tacdiff's loop (eps from the adapter, scheduler set to epsilon) against diffusers' v-prediction step."""
    model, scheduler = tiny_model("conv_unet"), cls(prediction_type="v_prediction")
    noise = sample_noise((3, 8, 8), 0, 2, seed=0)
    ours = run_trajectories([ModelDenoiser(model, scheduler)], scheduler, noise, num_inference_steps=STEPS,
                            progress=False)[0]
    scheduler.set_timesteps(STEPS)
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = model(scheduler.scale_model_input(x, t), t).sample
            x = scheduler.step(v, t, x).prev_sample
    assert scheduler.config.prediction_type == "v_prediction", "the loop works on its own copies"
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_learned_variance_keeps_the_noise_half() -> None:
    model = tiny_model("variance_unet")
    x, t = sample_noise((3, 8, 8), 0, 2, seed=1), torch.tensor(500)
    eps = ModelDenoiser(model)(x, t)
    assert eps.shape == x.shape and torch.equal(eps, model(x, t).sample[:, :3])


@torch.no_grad()
@pytest.mark.parametrize("name", ["class_unet", "cond_unet", "sdxl_unet"])
def test_guidance_is_one_batched_call_of_both_halves(name: str) -> None:
    model = tiny_model(name)
    channels, size = model.config.in_channels, model.config.sample_size
    x, t = sample_noise((channels, size, size), 0, 2, seed=2), torch.tensor(500)
    cond = tiny_cond(name, 2, seed=3) or {"class_labels": torch.tensor([1, 2])}
    uncond = {"class_labels": torch.tensor([0])} if name == "class_unet" else None
    denoise = ModelDenoiser(model)
    calls: list[int] = []
    counted = lambda x, t, **c: calls.append(len(x)) or denoise(x, t, **c)  # noqa: E731
    guided = ClassifierFreeGuidance(counted, 4.0, uncond)(x, t, **cond)
    assert calls == [4], "the unconditional and conditional halves go in one batch"
    unconditional = {"class_labels": torch.tensor([0, 0])} if uncond else _zeros(cond)
    eps_u, eps_c = denoise(x, t, **unconditional), denoise(x, t, **cond)
    torch.testing.assert_close(guided, eps_u + 4.0 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    assert (eps_c - eps_u).abs().mean() > 1e-3, "the conditioning matters, so the check above has teeth"
    torch.testing.assert_close(ClassifierFreeGuidance(denoise, 1.0, uncond)(x, t, **cond), eps_c, rtol=1e-4,
                               atol=1e-5)


def _zeros(cond: dict) -> dict:
    return {k: _zeros(v) if isinstance(v, dict) else torch.zeros_like(v) for k, v in cond.items()}


def test_wrappers_pass_correct_state_on() -> None:
    class Shifting:
        def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(x)

        def correct_state(self, x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
            return x + step

    wrapped = ClassifierFreeGuidance(DenoiserWrapper(Shifting()), 2.0)
    assert torch.equal(wrapped.correct_state(torch.zeros(1), torch.tensor(5), 3), torch.full((1,), 3.0))
    assert torch.equal(DenoiserWrapper(ModelDenoiser(tiny_model("conv_unet"))).correct_state(
        torch.ones(1), torch.tensor(5), 3), torch.ones(1)), "a model without the capability leaves the state"


def test_conditioning_trees_map_and_list_nested_tensors() -> None:
    cond = tiny_cond("sdxl_unet", 3, seed=0)
    halves = map_cond(cond, lambda v: v[:2])
    assert halves["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    assert [name for name, _ in cond_leaves(cond)] == ["encoder_hidden_states", "added_cond_kwargs.text_embeds",
                                                      "added_cond_kwargs.time_ids"]


@torch.no_grad()
def test_sdxl_conditioning_flows_through_quantization_and_tac_calibration() -> None:
    """SDXL's nested ``added_cond_kwargs`` are sliced per batch in calibration inputs, range calibration and
    the paired TAC fit (issue 14, part 5)."""
    fp = tiny_model("sdxl_unet")
    cond = tiny_cond("sdxl_unet", 4, seed=0)
    calibration = tacdiff.collect_calibration_set(fp, DDPMScheduler(), num_samples=4, num_inference_steps=STEPS,
                                                  kept_steps=STEPS, batch_size=3, cond=cond, progress=False)
    assert calibration.cond_of(torch.arange(4 * STEPS))["added_cond_kwargs"]["time_ids"].shape == (4 * STEPS, 6)
    quant = tacdiff.quantize(copy.deepcopy(fp), tacdiff.QuantConfig(weight_bits=8, act_bits=8), calibration,
                             batch_size=3, progress=False)
    tables = calibrate_tac(fp, quant, DDIMScheduler(), num_inference_steps=STEPS, num_samples=4, batch_size=3,
                           cond=cond, progress=False)
    assert tables.input_bias.shape == (STEPS, 4, 16, 16) and bool(torch.isfinite(tables.out_scale).all())
