"""The correction wrapper under diffusers schedulers and DDIMPipeline; tables on disk; every mismatch raises."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import (DDIMPipeline, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, SchedulerMixin, UNet2DModel)
from safetensors.torch import save_file
from torch import nn

from tacdiff.correction import CorrectedDenoiser, CorrectedUNet, CorrectionTables, calibrate_tac
from tacdiff.metrics.paired import paired_errors
from tacdiff.models.kinds import ModelDenoiser
from tacdiff.sampling import run_trajectories, sample, sample_noise

from correction_support import SHAPE, STEPS


@pytest.mark.parametrize("target", ["state", "input"])
@pytest.mark.parametrize("cls", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler],
                         ids=lambda c: c.__name__)
def test_wrapper_samples_with_matching_tables(fp_unet: UNet2DModel, w4a8_unet: nn.Module,
                                              cls: type[SchedulerMixin], target: str) -> None:
    scheduler = cls()
    tables = calibrate_tac(fp_unet, w4a8_unet, scheduler, num_inference_steps=4, num_samples=4, batch_size=4,
                           seed=0, ibc_target=target, progress=False)
    tables.check_scheduler(scheduler, 4)
    assert tables.ibc_target == target and tables.input_bias[1:].abs().sum() > 0
    seen = paired_errors(ModelDenoiser(fp_unet), CorrectedDenoiser(ModelDenoiser(w4a8_unet), tables), scheduler,
                         num_samples=4, sample_shape=SHAPE, num_inference_steps=4, seed=0, batch_size=4,
                         progress=False)
    if target == "state":  # mu_t on the latents: correct_state removes it, replaying the calibration seed
        assert seen.input_bias.abs().max() < 1e-5
    else:  # mu_t on the scaled model input: the latents keep it
        assert torch.allclose(seen.input_bias.float(), tables.input_bias.mean(dim=(-2, -1)), atol=1e-4)
    assert torch.isfinite(torch.tensor(seen.x0_mse))


def test_wrapper_inside_ddim_pipeline_matches_the_loop(w4a8_unet: nn.Module, ddim_input_tables: CorrectionTables,
                                                       ddim_tables: CorrectionTables) -> None:
    pipe = DDIMPipeline(unet=CorrectedUNet(w4a8_unet, ddim_input_tables), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    noise = torch.randn((2, *SHAPE), generator=torch.Generator().manual_seed(0))
    latents = sample(CorrectedDenoiser(ModelDenoiser(w4a8_unet), ddim_input_tables), DDIMScheduler(), noise,
                     num_inference_steps=STEPS, progress=False)
    expected = (latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == (2, 16, 16, 3)
    assert abs(images - expected).max() < 1e-5, "the pipeline's UNet drop-in and the loop's denoiser agree"
    with pytest.raises(ValueError, match="not in the correction tables"):
        pipe(batch_size=1, num_inference_steps=STEPS + 1, output_type="np")
    # Tables that shift the sampler state cannot work inside a pipeline: a clear error, not silent skipping.
    with pytest.raises(ValueError, match="shift the sampler state.*CorrectedDenoiser"):
        CorrectedUNet(w4a8_unet, ddim_tables)


def test_wrapper_matches_the_manual_correction_and_respects_return_dict(w4a8_unet: nn.Module,
                                                                        ddim_input_tables: CorrectionTables) -> None:
    tables = ddim_input_tables
    x, t = sample_noise(SHAPE, 0, 2, seed=1), tables.timesteps[2].long()
    mu, k = tables.input_bias[2].view(1, 3, 1, 1), tables.out_scale[2].view(1, 3, 1, 1)
    expected = w4a8_unet(x - mu, t).sample * k
    wrapped = CorrectedUNet(w4a8_unet, tables)
    assert torch.equal(wrapped(x, t).sample, expected)
    assert torch.equal(wrapped(x, t, return_dict=False)[0], expected)
    assert torch.equal(wrapped(x, t.expand(2)).sample, expected)
    assert wrapped.config is w4a8_unet.config and wrapped.dtype == torch.float32
    denoiser = CorrectedDenoiser(ModelDenoiser(w4a8_unet), tables)
    assert torch.equal(denoiser.correct_state(x, t, 2), x), "input-target tables leave the state alone"
    assert torch.equal(denoiser(x, t), expected)


def test_state_target_shifts_the_latents_not_the_input(w4a8_unet: nn.Module, ddim_tables: CorrectionTables) -> None:
    x, t = sample_noise(SHAPE, 0, 2, seed=1), ddim_tables.timesteps[2].long()
    mu, k = ddim_tables.input_bias[2], ddim_tables.out_scale[2].view(1, 3, 1, 1)  # element-wise mu: (C, H, W)
    denoiser = CorrectedDenoiser(ModelDenoiser(w4a8_unet), ddim_tables)
    shifted = denoiser.correct_state(x, t, 2)
    assert torch.equal(shifted, x - mu)
    assert torch.equal(denoiser(shifted, t), w4a8_unet(x - mu, t).sample * k), "the input is not shifted again"
    with pytest.raises(ValueError, match=r"fitted on \(16, 16\) latents, got \(8, 8\)"):
        denoiser.correct_state(sample_noise((3, 8, 8), 0, 2, seed=1), t, 2)


def test_other_schedules_raise(w4a8_unet: nn.Module, ddim_tables: CorrectionTables) -> None:
    denoiser = CorrectedDenoiser(ModelDenoiser(w4a8_unet), ddim_tables)
    noise = sample_noise(SHAPE, 0, 1, seed=0)
    for scheduler, steps in ((DDIMScheduler(), STEPS * 2), (EulerDiscreteScheduler(), STEPS)):
        with pytest.raises(ValueError, match="another schedule or step count"):
            run_trajectories([denoiser], scheduler, noise, num_inference_steps=steps, progress=False)
    with pytest.raises(ValueError, match=r"DDIMScheduler, 6 steps.*DDIMScheduler, 3 steps"):
        ddim_tables.check_scheduler(DDIMScheduler(), 3)
    with pytest.raises(ValueError, match="DDPMScheduler"):
        ddim_tables.check_scheduler(DDPMScheduler(), STEPS)


def test_steps_off_the_calibrated_schedule_raise(w4a8_unet: nn.Module, ddim_input_tables: CorrectionTables) -> None:
    # A schedule whose timesteps are a subset of the table's (e.g. 5 of 10 DDIM steps) puts a table
    # timestep at the wrong step: the loop passes the step index, so the check needs no call history.
    denoiser, x = CorrectedDenoiser(ModelDenoiser(w4a8_unet), ddim_input_tables), sample_noise(SHAPE, 0, 1, seed=0)
    t = ddim_input_tables.timesteps
    assert torch.equal(denoiser.correct_state(x, t[0], 0), x)
    for timestep, step in ((t[1], 0), (t[2], 1), (t[5], STEPS)):
        with pytest.raises(ValueError, match=f"step {step} of the sampler is at timestep {timestep.item():g}"):
            denoiser.correct_state(x, timestep, step)


def test_mixed_timesteps_take_one_row_per_sample(w4a8_unet: nn.Module, ddim_input_tables: CorrectionTables) -> None:
    tables, x = ddim_input_tables, sample_noise(SHAPE, 0, 2, seed=0)
    rows = [4, 1]
    mu, k = tables.input_bias[rows].view(2, 3, 1, 1), tables.out_scale[rows].view(2, 3, 1, 1)
    expected = w4a8_unet(x - mu, tables.timesteps[rows]).sample * k
    assert torch.equal(CorrectedUNet(w4a8_unet, tables)(x, tables.timesteps[rows]).sample, expected)


def test_tables_round_trip_through_safetensors(tmp_path: Path, ddim_tables: CorrectionTables) -> None:
    path = ddim_tables.save(tmp_path / "tables.safetensors")
    loaded = CorrectionTables.load(path)
    for name in ("timesteps", "input_bias", "out_scale", "out_bias", "residual_var"):
        assert torch.equal(getattr(loaded, name), getattr(ddim_tables, name)), name
    assert loaded.metadata == ddim_tables.metadata and loaded.describe() == ddim_tables.describe()
    assert loaded.ibc_target == ddim_tables.ibc_target == "state"
    assert loaded.scheduler_config["num_train_timesteps"] == 1000
    with pytest.raises(FileExistsError, match="overwrite"):
        ddim_tables.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tables.safetensors"]


def test_foreign_and_corrupt_tables_raise(tmp_path: Path, ddim_tables: CorrectionTables) -> None:
    good = ddim_tables.save(tmp_path / "good.safetensors").read_bytes()
    cases = {"truncated.safetensors": good[: len(good) // 2], "junk.safetensors": b"not a safetensors file"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            CorrectionTables.load(tmp_path / name)
    save_file({"weight": torch.zeros(2)}, tmp_path / "foreign.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a tacdiff correction table"):
        CorrectionTables.load(tmp_path / "foreign.safetensors")
    with pytest.raises(FileNotFoundError, match="tacdiff calibrate"):
        CorrectionTables.load(tmp_path / "missing.safetensors")


def test_inconsistent_tables_raise(w4a8_unet: nn.Module, ddim_tables: CorrectionTables) -> None:
    fields = dict(method="tac", timesteps=ddim_tables.timesteps, input_bias=ddim_tables.input_bias,
                  out_scale=ddim_tables.out_scale, out_bias=ddim_tables.out_bias,
                  residual_var=ddim_tables.residual_var, scheduler_class="DDIMScheduler", scheduler_config={},
                  num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="rows, one per timestep"):
        CorrectionTables(**{**fields, "out_scale": ddim_tables.out_scale[:-1]})
    with pytest.raises(ValueError, match="NaN"):
        CorrectionTables(**{**fields, "out_bias": ddim_tables.out_bias * float("nan")})
    with pytest.raises(ValueError, match="unknown correction method"):
        CorrectionTables(**{**fields, "method": "magic"})
    two_channel = CorrectionTables(**{**fields, "input_bias": ddim_tables.input_bias[:, :2],
                                      "out_scale": ddim_tables.out_scale[:, :2],
                                      "out_bias": ddim_tables.out_bias[:, :2]})
    with pytest.raises(ValueError, match="2 channels but the model outputs 3"):
        CorrectedUNet(w4a8_unet, two_channel)
    x, t = sample_noise(SHAPE, 0, 1, seed=0), ddim_tables.timesteps[0]
    with pytest.raises(ValueError, match="2 channels but the model outputs 3"):
        CorrectedDenoiser(ModelDenoiser(w4a8_unet), two_channel)
    bare = ModelDenoiser(w4a8_unet).__call__  # a denoiser without a model to check: the samples are checked
    with pytest.raises(ValueError, match="2 channels but the samples have 3"):
        CorrectedDenoiser(bare, two_channel)(x, t)


def test_tables_fitted_on_another_backend_warn(w4a8_unet: nn.Module, ddim_tables: CorrectionTables) -> None:
    assert ddim_tables.metadata["backend"] == "fake"  # the fake-quant model they were fitted on
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CorrectedDenoiser(ModelDenoiser(w4a8_unet), ddim_tables)
    int8_fitted = copy.copy(ddim_tables)
    int8_fitted.metadata = {**ddim_tables.metadata, "backend": "int8"}
    with pytest.warns(UserWarning, match="fitted with the model running on the int8 backend, and it now runs on "
                                         "fake.*tacdiff calibrate --backend fake"):
        CorrectedDenoiser(ModelDenoiser(w4a8_unet), int8_fitted)
