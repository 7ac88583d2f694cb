"""load_pipeline: quantized diffusers pipelines corrected by TAC tables sample exactly as tacdiff's loop does."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, LDMPipeline, SchedulerMixin, StableDiffusionPipeline

import tacdiff
from tacdiff.backends.int8 import Int8Conv2d
from tacdiff.correction import CorrectedDenoiser, CorrectionTables, calibrate_tac, load_pipeline
from tacdiff.correction.pipeline import PipelineUNet, StateShiftingStep
from tacdiff.io.artifact import save_quantized
from tacdiff.models.kinds import ModelDenoiser
from tacdiff.models.loading import PIPELINE_KEY, LoadedModel, build_scheduler, load_any_model
from tacdiff.sampling import batched_trajectories, sample, sample_noise
from tacdiff.sampling.batching import derive_seed
from tacdiff.sampling.conditioning import PromptOptions, conditioning_for, named_classes

from tiny_models import tiny_model
from tiny_pipelines import save_tiny_pipeline

STEPS, SCALE, SEED = 4, 5.0, 3
PROMPTS, CLASS = ["a red shoe", "a cat"], "sneaker"


@dataclass
class World:
    """A tiny pipeline folder, a W4A8 artifact quantized from it and its TAC tables (state and input IBC, and
    with prompts one NER scale per guidance branch)."""

    folder: Path
    artifact: Path
    tables: Path
    input_tables: Path
    branch_tables: Path | None


def _scheduler(loaded: LoadedModel) -> SchedulerMixin:
    """The sampler tables are fitted for: DDIM, or flow matching for a flow model, from the recorded config."""
    return build_scheduler("auto", loaded.scheduler_config, loaded.model)


def _world(root: Path, name: str, options: PromptOptions | None) -> World:
    folder = save_tiny_pipeline(name, root / name)
    loaded = load_any_model(folder)
    fp, scheduler = loaded.model, _scheduler(loaded)
    cond = None if options is None else conditioning_for(loaded, options, count=8)
    calib = tacdiff.collect_calibration_set(fp, scheduler, num_samples=4, num_inference_steps=STEPS,
                                            kept_steps=STEPS, cond=cond, progress=False)
    quant = tacdiff.quantize(copy.deepcopy(fp), tacdiff.QuantConfig(weight_bits=4, act_bits=8), calib, progress=False)
    artifact = save_quantized(quant, root / f"{name}-w4a8", metadata={
        PIPELINE_KEY: str(folder), "scheduler_class": type(scheduler).__name__,
        "scheduler_config": json.dumps(dict(scheduler.config))})
    fit = dict(num_inference_steps=STEPS, num_samples=8, batch_size=8, cond=cond, progress=False)
    tables = calibrate_tac(fp, quant, scheduler, **fit).save(root / f"{name}-tac.safetensors")
    input_tables = calibrate_tac(fp, quant, scheduler, ibc="channel", ibc_target="input", **fit)
    branch_tables = None if cond is None else calibrate_tac(fp, quant, scheduler, guidance_fit="branch", **fit).save(
        root / f"{name}-tac-branch.safetensors")
    return World(folder, artifact, tables, input_tables.save(root / f"{name}-tac-input.safetensors"), branch_tables)


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and far faster on a busy machine, where threads wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> World:
    return _world(tmp_path_factory.mktemp("pipelines"), "sd", PromptOptions(tuple(PROMPTS), guidance_scale=SCALE))


@pytest.fixture(scope="module")
def ldm(tmp_path_factory: pytest.TempPathFactory) -> World:
    return _world(tmp_path_factory.mktemp("pipelines"), "ldm", None)


def _generate(pipe: DiffusionPipeline, noise: torch.Tensor, **overrides: object) -> torch.Tensor:
    """Final latents of a text-to-image pipeline's call for ``PROMPTS[0]`` from ``noise``."""
    settings = dict(num_inference_steps=STEPS, guidance_scale=SCALE, latents=noise, output_type="latent")
    if type(pipe).__name__.startswith("PixArt"):
        settings["use_resolution_binning"] = False  # its bins are for 256-1024 pixel models
    return pipe(PROMPTS[0], **{**settings, **overrides}).images


def _loop(world: World, tables: Path) -> torch.Tensor:
    """tacdiff's own loop on sample 0's noise for seed ``SEED``, guided and corrected as the pipeline should be."""
    loaded = load_any_model(world.artifact)
    scheduler = _scheduler(loaded)
    options = PromptOptions(classes=(CLASS,)) if named_classes(loaded) else PromptOptions(tuple(PROMPTS[:1]))
    cond = conditioning_for(loaded, dataclasses.replace(options, guidance_scale=SCALE))
    denoiser = cond.guide(CorrectedDenoiser(ModelDenoiser(loaded.model, scheduler), CorrectionTables.load(tables)))
    (_, [latents]), = batched_trajectories([denoiser], scheduler, num_samples=1, sample_shape=(4, 8, 8),
                                           num_inference_steps=STEPS, seed=SEED, cond=cond.rows, progress=False)
    return latents


@pytest.mark.parametrize("target", ["state", "input", "branch"])
def test_corrected_pipeline_equals_the_loop(sd: World, target: str) -> None:
    tables = {"state": sd.tables, "input": sd.input_tables, "branch": sd.branch_tables}[target]
    pipe = load_pipeline(sd.artifact, tables)
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.unet, PipelineUNet)
    assert isinstance(pipe.scheduler.step, StateShiftingStep) == (target != "input")
    noise = sample_noise((4, 8, 8), 0, 1, SEED)
    latents, expected = _generate(pipe, noise), _loop(sd, tables)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)
    assert torch.equal(_generate(pipe, noise), latents), "a second call samples alike (no call-order state)"
    plain = _generate(load_pipeline(sd.artifact), noise)
    print(f"{target} IBC: max |pipeline - loop| = {(latents - expected).abs().max().item():.3g}, "
          f"uncorrected pipeline - loop = {(plain - expected).abs().max().item():.3g}")
    assert (plain - expected).abs().max() > 1e-2, "the correction matters"


def test_guidance_and_step_count_are_checked_before_the_model_runs(sd: World) -> None:
    pipe, noise = load_pipeline(sd.artifact, sd.tables), sample_noise((4, 8, 8), 0, 1, SEED)
    calls: list[int] = []
    pipe.unet.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(ValueError, match=r"guidance scale 5.0 \(tables\) vs 2.0"):
        _generate(pipe, noise, guidance_scale=2.0)
    # 2 steps visit 501 and 1, both in the 4-step tables: the schedule is checked, not just the timestep
    with pytest.raises(ValueError, match="pipeline samples 2 steps .* num_inference_steps=4"):
        _generate(pipe, noise, num_inference_steps=2)
    assert not calls, "no image was made"
    forced = load_pipeline(sd.artifact, sd.tables, force_tables=True)
    with pytest.warns(UserWarning, match=r"guidance scale 5.0 .*\(applied anyway"):
        assert torch.isfinite(_generate(forced, noise, guidance_scale=2.0)).all()


def test_a_replaced_scheduler_raises(sd: World) -> None:
    pipe = load_pipeline(sd.artifact, sd.tables)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="scheduler was replaced"):
        _generate(pipe, sample_noise((4, 8, 8), 0, 1, SEED))


def test_the_step_hook_looks_like_the_step_and_checks_the_schedule(sd: World) -> None:
    tables = CorrectionTables.load(sd.tables)
    scheduler = _scheduler(load_any_model(sd.folder))
    scheduler.step = StateShiftingStep(scheduler.step, tables)
    assert {"eta", "generator"} <= set(inspect.signature(scheduler.step).parameters)
    copied = copy.deepcopy(scheduler)
    assert copied.step.__wrapped__.__self__ is copied, "a copy steps itself"
    scheduler.set_timesteps(STEPS)
    x, eps, t = sample_noise((4, 8, 8), 0, 2, 0), sample_noise((4, 8, 8), 2, 2, 0), scheduler.timesteps[1]
    plain = DDIMScheduler.from_config(scheduler.config)
    plain.set_timesteps(STEPS)
    expected = plain.step(eps, t, x).prev_sample - tables.input_bias[2]
    assert torch.equal(scheduler.step(eps, t, x).prev_sample, expected)
    assert torch.equal(scheduler.step(eps, t, x, return_dict=False)[0], expected)
    last = scheduler.timesteps[-1]
    assert torch.equal(scheduler.step(eps, last, x).prev_sample, plain.step(eps, last, x).prev_sample)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="pipeline samples 2 steps"):
        scheduler.step(eps, scheduler.timesteps[0], x)


def test_tables_for_the_pipelines_scheduler_class_replace_it(sd: World, tmp_path: Path) -> None:
    folder = shutil.copytree(sd.folder, tmp_path / "pndm")  # Stable Diffusion ships PNDM; tables are DDIM's
    config = folder / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "PNDMScheduler"}))
    with pytest.warns(UserWarning, match="not quantized by tacdiff"):  # the tables are for the quantized model
        pipe = load_pipeline(folder, sd.tables, force_tables=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.clip_sample is False and pipe.scheduler.config.steps_offset == 1


def test_state_tables_must_start_at_zero(sd: World) -> None:
    tables = CorrectionTables.load(sd.tables)
    shifted = dataclasses.replace(tables, input_bias=tables.input_bias + 0.1)
    with pytest.raises(ValueError, match="row 0 is non-zero"):
        load_pipeline(sd.artifact, shifted)


def test_unconditional_ldm_pipeline_equals_the_loop(ldm: World) -> None:
    pipe = load_pipeline(ldm.artifact, ldm.tables)
    assert isinstance(pipe, LDMPipeline)
    run = dict(batch_size=2, num_inference_steps=STEPS, output_type="np")
    images = pipe(generator=torch.Generator().manual_seed(SEED), **run).images
    loaded = load_any_model(ldm.artifact)
    scheduler = _scheduler(loaded)
    noise = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(SEED))
    denoiser = CorrectedDenoiser(ModelDenoiser(loaded.model, scheduler), CorrectionTables.load(ldm.tables))
    latents = sample(denoiser, scheduler, noise, num_inference_steps=STEPS, progress=False)
    with torch.no_grad():
        expected = (loaded.decode(latents) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-6)
    plain = load_pipeline(ldm.artifact)(generator=torch.Generator().manual_seed(SEED), **run).images
    print(f"LDM: max |pipeline - loop| = {np.abs(images - expected).max():.3g}, "
          f"uncorrected pipeline - loop = {np.abs(plain - expected).max():.3g}")
    assert np.abs(plain - expected).max() > 1e-3, "the correction matters"


def test_bare_models_are_refused(ldm: World, tmp_path: Path) -> None:
    folder = tmp_path / "unet"
    tiny_model("conv_unet").save_pretrained(folder)
    bare = save_quantized(load_any_model(ldm.artifact).model, tmp_path / "bare-w4a8")  # no pipeline recorded
    for path in (folder, bare):
        with pytest.raises(ValueError, match="load_pipeline needs a diffusers pipeline folder"):
            load_pipeline(path, ldm.tables)


def test_a_corrected_pipeline_refuses_save_pretrained(sd: World, tmp_path: Path) -> None:
    """diffusers would write a folder without a UNet (the wrapper is no diffusers model) and return normally."""
    with pytest.raises(ValueError, match="cannot be saved with save_pretrained"):
        load_pipeline(sd.artifact, sd.tables).save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


def test_int8_pipeline_with_tables_is_as_accurate_as_fake_quant(sd: World) -> None:
    """TAC tables apply unchanged on the int8 backend: latent PSNR against FP within 0.3 dB of fake-quant's."""
    noise = torch.cat([sample_noise((4, 8, 8), i, 1, SEED) for i in range(4)])
    fp = _generate(StableDiffusionPipeline.from_pretrained(sd.folder), noise, num_images_per_prompt=4)
    psnr = {}
    for backend in ("fake", "int8"):
        pipe = load_pipeline(sd.artifact, sd.tables, backend=backend)
        assert any(isinstance(m, Int8Conv2d) for m in pipe.unet.modules()) == (backend == "int8")
        latents = _generate(pipe, noise, num_images_per_prompt=4)
        psnr[backend] = (10 * torch.log10(fp.pow(2).mean() / (latents - fp).pow(2).mean())).item()
    assert abs(psnr["fake"] - psnr["int8"]) <= 0.3, psnr


@pytest.fixture(scope="module")
def transformer_worlds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, World]:
    root = tmp_path_factory.mktemp("transformer-pipelines")
    options = {"pixart": PromptOptions(tuple(PROMPTS), guidance_scale=SCALE),
               "sd3": PromptOptions(tuple(PROMPTS), guidance_scale=SCALE),
               "sd3_shifting": PromptOptions(tuple(PROMPTS), guidance_scale=SCALE),
               "dit": PromptOptions(classes=(CLASS, "bag"), guidance_scale=SCALE)}
    return {name: _world(root, name, option) for name, option in options.items()}


@pytest.mark.parametrize("name", ["pixart", "sd3", "sd3_shifting", "dit"])
def test_corrected_transformer_pipelines_equal_the_loop(transformer_worlds: dict[str, World], name: str) -> None:
    """PixArt (learned variance, its DPM-Solver replaced by the tables' DDIM), SD3 (flow matching: the
    velocity corrected; with sigmas shifted by image size too) and DiT (class labels; its images, since
    DiTPipeline returns no latents)."""
    world = transformer_worlds[name]
    pipe = load_pipeline(world.artifact, world.tables)
    assert type(pipe).__name__ == type(load_any_model(world.folder).pipeline).__name__
    assert isinstance(pipe.transformer, PipelineUNet) and isinstance(pipe.scheduler.step, StateShiftingStep)
    expected = _loop(world, world.tables)
    if name == "dit":
        loaded = load_any_model(world.artifact)
        with torch.no_grad():
            expected = (loaded.decode(expected) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        images = pipe(pipe.get_label_ids([CLASS]), guidance_scale=SCALE, num_inference_steps=STEPS, output_type="np",
                      generator=torch.Generator().manual_seed(derive_seed(SEED, "noise", 0))).images
        torch.testing.assert_close(torch.from_numpy(images), expected, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match=r"guidance scale 5.0 \(tables\) vs 4.0"):  # DiTPipeline's default
            pipe(pipe.get_label_ids([CLASS]), num_inference_steps=STEPS)
        return
    noise = sample_noise((4, 8, 8), 0, 1, SEED)
    latents = _generate(pipe, noise)
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-5)
    plain = _generate(load_pipeline(world.artifact), noise)
    assert (plain - expected).abs().max() > 100 * (latents - expected).abs().max(), "the correction matters"
