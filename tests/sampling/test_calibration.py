"""Calibration inputs recorded from the FP model's own DDIM sampling."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

import tacdiff
from tacdiff.sampling import CalibrationSet, collect_calibration_set
from tiny_models import tiny_cond, tiny_model


def collect(model: nn.Module, **kwargs: object) -> CalibrationSet:
    settings = dict(num_samples=3, num_inference_steps=10, kept_steps=4, seed=0, progress=False)
    return collect_calibration_set(model, DDPMScheduler(), **{**settings, **kwargs})


def ddim_timesteps(steps: int) -> torch.Tensor:
    scheduler = DDIMScheduler.from_config(DDPMScheduler().config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


@pytest.mark.parametrize("samples, steps, kept, batch", [(3, 10, 4, 64), (5, 7, 7, 2), (2, 20, 1, 1), (4, 6, None, 3),
                                                         (1, 5, 50, 8)])
def test_shape_and_uniformly_subsampled_timesteps(unet: nn.Module, samples: int, steps: int, kept: int | None,
                                                  batch: int) -> None:
    data = collect(unet, num_samples=samples, num_inference_steps=steps, kept_steps=kept, batch_size=batch)
    n_kept = steps if kept is None else min(kept, steps)
    assert data.x.shape == (samples * n_kept, 3, 16, 16) and len(data) == samples * n_kept
    assert data.x.dtype == torch.float32 and data.x.device.type == "cpu" and data.cond == {}
    every = ddim_timesteps(steps)
    picked = torch.linspace(0, steps - 1, n_kept).round().long()
    expected = every[picked].float()
    assert torch.equal(torch.unique(data.timesteps).sort(descending=True).values, expected)
    assert expected[0] == every[0] and (n_kept == 1 or expected[-1] == every[-1]), "ends are always kept"
    gaps = picked.diff()
    assert n_kept < 3 or gaps.max() - gaps.min() <= 1, "kept steps are evenly spaced"
    counts = torch.unique(data.timesteps, return_counts=True)[1]
    assert (counts == samples).all()


def test_first_kept_inputs_are_the_seeded_noise_and_later_ones_are_denoised(unet: nn.Module) -> None:
    data = collect(unet, kept_steps=10)
    first = data.x[data.timesteps == data.timesteps.max()]
    assert first.std().item() == pytest.approx(1.0, abs=0.15)
    assert not torch.equal(first, data.x[data.timesteps == data.timesteps.min()])


def test_same_seed_is_deterministic_and_seeds_differ(unet: nn.Module) -> None:
    a, b, c = collect(unet, seed=7), collect(unet, seed=7), collect(unet, seed=8)
    assert torch.equal(a.x, b.x) and torch.equal(a.timesteps, b.timesteps)
    assert not torch.equal(a.x, c.x) and torch.equal(a.timesteps, c.timesteps)


def test_inputs_do_not_depend_on_the_batch_size(unet: nn.Module) -> None:
    whole, parts = collect(unet, batch_size=3), collect(unet, batch_size=2)
    assert torch.equal(whole.timesteps, parts.timesteps)
    first = whole.timesteps == whole.timesteps.max()
    assert torch.equal(parts.x[first], whole.x[first]), "sample i starts from its own noise in any batch"
    # float32 convolutions round differently per batch size (~1e-4 after 10 steps); other noise differs by O(1)
    torch.testing.assert_close(parts.x, whole.x, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_batches_share_one_timestep_and_cover_everything_once(unet: nn.Module, batch_size: int) -> None:
    data = collect(unet)
    seen = []
    for x, t, cond in data.batches(batch_size):
        assert len(t) <= batch_size and torch.unique(t).numel() == 1 and cond == {}
        seen.append(x)
    everything = torch.cat(seen)
    assert everything.shape == data.x.shape
    by_first_value = [rows[rows[:, 0, 0, 0].argsort()] for rows in (everything, data.x)]
    assert torch.equal(*by_first_value), "the batches are a permutation of the set"
    with pytest.raises(ValueError, match="batch_size"):
        next(data.batches(0))


@torch.no_grad()
def test_conditioning_rows_travel_with_their_trajectories() -> None:
    """Every recorded ``(x, t, cond)`` steps, under DDIM with that cond, to a recorded input of the next step."""
    model = tiny_model("cond_unet")
    steps, samples = 4, 3
    text = tiny_cond("cond_unet", samples, seed=5)
    data = collect_calibration_set(model, DDPMScheduler(), num_samples=samples, num_inference_steps=steps,
                                   kept_steps=None, seed=0, batch_size=2, cond=text, progress=False)
    cond = data.cond_of(torch.arange(len(data)))["encoder_hidden_states"]
    assert cond.shape == (samples * steps, 7, 32)
    assert data.cond["encoder_hidden_states"].shape == (samples, 7, 32), "one row per trajectory, not per input"
    for t in torch.unique(data.timesteps):  # each step holds every prompt exactly once
        rows = cond[data.timesteps == t]
        assert sorted(rows.sum((1, 2)).tolist()) == pytest.approx(sorted(text["encoder_hidden_states"].sum((1, 2))
                                                                         .tolist()))
    scheduler = DDIMScheduler.from_config(DDPMScheduler().config)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    for now, later in zip(timesteps[:-1], timesteps[1:]):
        here, there = (torch.nonzero(data.timesteps == float(s)).flatten() for s in (now, later))
        eps = model(data.x[here], now, encoder_hidden_states=cond[here]).sample
        stepped = scheduler.step(eps, now, data.x[here]).prev_sample
        distance = torch.cdist(stepped.flatten(1), data.x[there].flatten(1))
        match = distance.argmin(1)
        assert distance.min(1).values.max() < 1e-3, "every input steps onto a recorded input"
        assert torch.equal(cond[here], cond[there][match]), "and keeps its conditioning"
    wrong = torch.roll(cond, 1, 0)
    eps = model(data.x[:1], timesteps[0], encoder_hidden_states=wrong[:1]).sample
    assert not torch.allclose(eps, model(data.x[:1], timesteps[0], encoder_hidden_states=cond[:1]).sample, atol=1e-3)


def test_subset_is_seeded_and_keeps_rows_aligned(unet: nn.Module) -> None:
    data = collect(unet, cond=None)
    aligned = CalibrationSet(data.x, data.timesteps, {"tag": torch.arange(len(data)).float()[:, None]})
    small, again = aligned.subset(5, seed=1), aligned.subset(5, seed=1)
    assert len(small) == 5 and torch.equal(small.x, again.x)
    rows = small.cond_of(torch.arange(5))["tag"][:, 0].long()
    assert torch.equal(small.x, data.x[rows]) and torch.equal(small.timesteps, data.timesteps[rows])
    assert aligned.subset(1000) is aligned


def test_batches_cast_floating_tensors_only() -> None:
    data = CalibrationSet(torch.randn(3, 1, 2, 2), torch.tensor([5, 5, 5]),
                          {"class_labels": torch.tensor([0, 1, 2]), "encoder_hidden_states": torch.randn(3, 4, 2)})
    x, t, cond = next(data.batches(3, dtype=torch.bfloat16))
    assert x.dtype == cond["encoder_hidden_states"].dtype == torch.bfloat16
    assert t.dtype == cond["class_labels"].dtype == torch.int64


def test_calibration_set_validates_its_rows() -> None:
    x = torch.zeros(4, 3, 8, 8)
    with pytest.raises(ValueError, match="empty"):
        CalibrationSet(x[:0], torch.zeros(0), {})
    with pytest.raises(ValueError, match="timesteps must have shape"):
        CalibrationSet(x, torch.zeros(3), {})
    with pytest.raises(ValueError, match="cond\\['c'\\] has 2 rows"):
        CalibrationSet(x, torch.zeros(4), {"c": torch.zeros(2, 5)})


@pytest.mark.parametrize("kwargs, match", [({"num_samples": 0}, "num_samples"),
                                           ({"num_inference_steps": 0}, "num_inference_steps")])
def test_bad_arguments_raise(unet: nn.Module, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        collect(unet, **kwargs)


@pytest.mark.parametrize("kwargs, match", [({"kept_steps": 0}, "kept_steps"), ({"kept_steps": -1}, "kept_steps"),
                                           ({"batch_size": 0}, "batch_size")])
def test_bad_step_and_batch_arguments_raise_naming_them(unet: nn.Module, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        collect(unet, **kwargs)


def test_sample_shape_is_read_from_the_config_or_given(unet: nn.Module) -> None:
    data = collect(unet, num_samples=1, kept_steps=1, sample_shape=(3, 8, 8))
    assert data.x.shape == (1, 3, 8, 8)
    with pytest.raises(ValueError, match="sample_shape"):
        collect_calibration_set(nn.Conv2d(3, 3, 1), DDPMScheduler(), num_samples=1, progress=False)


def test_public_api_exports(unet: nn.Module) -> None:
    assert tacdiff.collect_calibration_set is collect_calibration_set and tacdiff.CalibrationSet is CalibrationSet
