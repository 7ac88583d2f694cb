"""Paired trajectory errors: exact zeros for a self-pair (stochastic too), positive for a quantized model, streaming."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, SchedulerMixin, UNet2DModel)
from torch import nn

import tacdiff
from tacdiff.metrics import PairedErrors, PairedStepStats, paired_errors, psnr_db, sqnr_db
from tacdiff.metrics.paired import psnr_gap, ssim_sum
from tacdiff.models.kinds import ModelDenoiser
from tacdiff.sampling import StepRecord
from tiny_models import tiny_model
from tacdiff.sampling.batching import batched_trajectories, sample_noise

SHAPE, STEPS, N = (3, 8, 8), 4, 6


@pytest.fixture(scope="module")
def fp() -> UNet2DModel:
    return tiny_model("conv_unet")


@pytest.fixture(scope="module")
def w4(fp: UNet2DModel) -> nn.Module:
    return tacdiff.quantize(copy.deepcopy(fp), tacdiff.QuantConfig(weight_bits=4, act_bits=None), progress=False)


def run(reference: nn.Module, estimate: nn.Module, scheduler: SchedulerMixin, **kwargs: object) -> PairedErrors:
    settings = dict(num_samples=N, sample_shape=SHAPE, num_inference_steps=STEPS, seed=3, batch_size=N,
                    progress=False)
    return paired_errors(ModelDenoiser(reference), ModelDenoiser(estimate), scheduler, **{**settings, **kwargs})


SCHEDULERS = [DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler]


@pytest.mark.parametrize("cls", SCHEDULERS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("batch_size", [N, 4])
def test_self_pair_is_exactly_zero(fp: UNet2DModel, cls: type[SchedulerMixin], batch_size: int) -> None:
    # DDPM draws fresh noise every step: a zero here means both trajectories got the same noise.
    result = run(fp, fp, cls.from_config(DDPMScheduler().config), batch_size=batch_size)
    assert result.x0_mse == 0 and math.isinf(result.x0_psnr) and result.x0_ssim == pytest.approx(1.0)
    assert result.state_sq_err.eq(0).all() and result.eps_sq_err.eq(0).all() and result.input_bias.eq(0).all()
    assert result.timesteps.shape == (STEPS,) and result.input_bias.shape == (STEPS, SHAPE[0])


def test_quantized_model_has_positive_errors(fp: UNet2DModel, w4: nn.Module) -> None:
    scheduler = DDIMScheduler.from_config(DDPMScheduler().config)
    result = run(fp, w4, scheduler)
    assert 0 < result.x0_mse and math.isfinite(result.x0_psnr) and -1 < result.x0_ssim < 1
    assert result.x0_psnr == pytest.approx(10 * math.log10(4 / result.x0_mse))
    assert result.state_sq_err[0] == 0, "both trajectories start from the same noise"
    assert (result.state_sq_err[1:] > 0).all() and (result.eps_sq_err > 0).all()
    assert result.input_bias[1:].abs().sum() > 0
    scheduler.set_timesteps(STEPS)
    assert result.timesteps.tolist() == scheduler.timesteps.float().tolist()


def test_streamed_equals_one_batch(fp: UNet2DModel, w4: nn.Module) -> None:
    scheduler = DDIMScheduler.from_config(DDPMScheduler().config)
    # float32 convolutions may round differently per batch size: equal up to that rounding
    whole, streamed = run(fp, w4, scheduler, batch_size=N), run(fp, w4, scheduler, batch_size=4)
    assert streamed.x0_mse == pytest.approx(whole.x0_mse, rel=1e-5)
    for name in ("state_sq_err", "eps_sq_err", "input_bias"):
        torch.testing.assert_close(getattr(streamed, name), getattr(whole, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", [DDPMScheduler, EulerAncestralDiscreteScheduler], ids=lambda c: c.__name__)
def test_stochastic_samples_do_not_depend_on_the_batch_size(fp: UNet2DModel, cls: type[SchedulerMixin]) -> None:
    scheduler = cls.from_config(DDPMScheduler().config)

    def images(batch_size: int, seed: int = 3) -> torch.Tensor:
        return torch.cat([finals[0] for _, finals in batched_trajectories(
            [ModelDenoiser(fp)], scheduler, num_samples=N, sample_shape=SHAPE, num_inference_steps=STEPS,
            seed=seed, batch_size=batch_size, progress=False)])

    whole = images(N)
    # float32 convolutions may round differently per batch size (Euler's sigma scaling amplifies that
    # to ~2e-4); different per-step noise would differ by O(1)
    torch.testing.assert_close(images(4), whole, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(images(1), whole, rtol=1e-3, atol=1e-3)
    assert (images(N, seed=4) - whole).abs().max() > 0.1


def test_per_sample_seeds_must_match_the_batch(fp: UNet2DModel) -> None:
    with pytest.raises(ValueError, match="per-sample seeds"):
        tacdiff.sampling.run_trajectories([ModelDenoiser(fp)], DDPMScheduler(), torch.zeros(2, *SHAPE),
                                          num_inference_steps=2, seed=[1, 2, 3], progress=False)


def test_on_batch_sees_clamped_images_in_order(fp: UNet2DModel, w4: nn.Module) -> None:
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    scheduler = EulerDiscreteScheduler.from_config(DDPMScheduler().config)
    result = run(fp, w4, scheduler, batch_size=4, on_batch=lambda s, r, e: seen.append((s, r, e)))
    assert [s for s, _, _ in seen] == [0, 4] and sum(len(r) for _, r, _ in seen) == N
    ref, est = torch.cat([r for _, r, _ in seen]), torch.cat([e for _, _, e in seen])
    assert ref.abs().max() <= 1 and est.abs().max() <= 1
    assert result.x0_mse == pytest.approx((est.double() - ref.double()).pow(2).mean().item())
    assert torch.equal(result.x0_mse_per_image, (est.double() - ref.double()).pow(2).flatten(1).mean(1))


def test_sample_noise_is_independent_of_batching() -> None:
    whole = sample_noise(SHAPE, 0, 5, seed=7)
    parts = torch.cat([sample_noise(SHAPE, 0, 2, seed=7), sample_noise(SHAPE, 2, 3, seed=7)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, sample_noise(SHAPE, 0, 5, seed=8))


def record(step: int, t: float, ref: torch.Tensor, est: torch.Tensor) -> StepRecord:
    return StepRecord(step, torch.tensor(t), [ref, est], [ref, est], [ref * 2, est * 2])


def test_step_stats_match_hand_computation() -> None:
    ref = torch.zeros(2, 2, 1, 2)
    est = torch.tensor([[[[1.0, 1.0]], [[0.0, 2.0]]], [[[3.0, 3.0]], [[0.0, 0.0]]]])
    stats = PairedStepStats()
    stats(record(0, 10.0, ref[:1], est[:1]))  # two batches of one sample each
    stats(record(0, 10.0, ref[1:], est[1:]))
    state_sq, eps_sq = stats.mean_sq_norms()
    assert state_sq.tolist() == [(6 + 18) / 2] and eps_sq.tolist() == [4 * (6 + 18) / 2]
    assert stats.mean_input_bias().tolist() == [[2.0, 0.5]]
    per_element = PairedStepStats(granularity="element")
    per_element(record(0, 10.0, ref, est))
    assert per_element.mean_input_bias().shape == (1, 2, 1, 2)
    with pytest.raises(ValueError, match="does not match"):
        stats(record(0, 9.0, ref, est))
    with pytest.raises(ValueError, match="no steps recorded"):
        PairedStepStats().mean_input_bias()


def test_sqnr_and_psnr() -> None:
    ref = torch.ones(10)
    assert sqnr_db(ref, ref * 1.1) == pytest.approx(20.0)
    assert math.isinf(sqnr_db(ref, ref.clone())) and sqnr_db(ref, ref) > 0
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf
    assert psnr_db(0.04) == pytest.approx(20.0) and math.isinf(psnr_db(0.0))
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr_db(ref, torch.ones(3))


def test_ssim_is_one_for_equal_images_and_falls_with_noise() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 1, 28, 28, generator=g) * 2 - 1
    assert ssim_sum(images, images) == pytest.approx(4.0)
    slightly, badly = (images + s * torch.randn(images.shape, generator=g) for s in (0.05, 0.5))
    assert 4.0 > ssim_sum(images, slightly) > ssim_sum(images, badly)
    assert ssim_sum(images[..., :8, :8], images[..., :8, :8]) == pytest.approx(4.0)  # a window that fits 8 px


def test_psnr_gap_is_the_psnr_difference_with_an_interval_around_it() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(200, generator=g, dtype=torch.float64) * 0.01
    gap, low, high = psnr_gap(base, base / 2)  # half the error everywhere: +3.01 dB on every resample
    assert gap == pytest.approx(10 * math.log10(2)) and low == pytest.approx(gap) and high == pytest.approx(gap)
    other = base * torch.exp(torch.randn(200, generator=g, dtype=torch.float64))  # noisy, no change on average
    gap, low, high = psnr_gap(base, other)
    assert gap == pytest.approx(psnr_db(other.mean().item()) - psnr_db(base.mean().item()))
    assert low < gap < high and high - low > 0.1
    assert psnr_gap(base, other, confidence=0.5)[1] > low  # a narrower interval


@pytest.mark.parametrize("base, other", [([1.0, 2.0], [1.0]), ([1.0], [1.0]), ([[1.0, 2.0]], [[1.0, 2.0]])])
def test_psnr_gap_needs_two_equal_lists(base, other) -> None:
    with pytest.raises(ValueError, match="equal-length"):
        psnr_gap(base, other)
