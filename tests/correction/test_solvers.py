"""NER's closed form against a numerical minimiser, streaming and merging; IBC means; the PTQD fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize, minimize_scalar

from tacdiff.correction import AbsMean, NERStats, input_bias, mask_threshold, ner_scale, ner_stats, ptqd_fit
from tacdiff.correction.ptqd import PTQDStats


def ner_loss(k: float, q: np.ndarray, r: np.ndarray, lam: float, gamma: float, tau: float, bias: float = 0.0
             ) -> float:
    """METHOD.md's loss for one channel, written out directly (empty mask: no relative term), of the correction
    ``k (q - bias)``."""
    mask = np.abs(r) > tau * np.abs(r).mean()
    corrected = k * (q - bias)
    relative = np.mean(((corrected[mask] - r[mask]) / r[mask]) ** 2) if mask.any() else 0.0
    return (1 - lam) * np.mean((corrected - r) ** 2) + lam * relative + gamma * (k - 1) ** 2


def pair(seed: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(shape, generator=gen, dtype=torch.float64)
    q = 0.8 * r + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64) + 0.05
    return q, r


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 4),
       w=st.integers(1, 4), lam=st.floats(0, 1), gamma=st.floats(0, 2), tau=st.floats(0, 2))
def test_ner_scale_is_the_numerical_minimiser(seed: int, n: int, c: int, h: int, w: int, lam: float, gamma: float,
                                              tau: float) -> None:
    q, r = pair(seed, (n, c, h, w))
    scale = ner_scale(q, r, lam=lam, gamma=gamma, tau=tau)
    assert scale.shape == (c,)
    for ch in range(c):
        qc, rc = q[:, ch].numpy().ravel(), r[:, ch].numpy().ravel()
        best = minimize_scalar(lambda k: ner_loss(k, qc, rc, lam, gamma, tau), bracket=(-5.0, 5.0),
                               options={"xtol": 1e-12})
        closed = ner_loss(scale[ch].item(), qc, rc, lam, gamma, tau)
        assert closed <= best.fun + 1e-9 * (1 + abs(best.fun))
        assert scale[ch].item() == pytest.approx(best.x, rel=1e-4, abs=1e-4)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 3), c=st.integers(1, 2), h=st.integers(2, 4),
       lam=st.floats(0, 1), gamma=st.floats(0, 2), tau=st.floats(0, 1))
def test_ner_with_a_bias_is_the_numerical_minimiser(seed: int, n: int, c: int, h: int, lam: float, gamma: float,
                                                    tau: float) -> None:
    q, r = pair(seed, (n, c, h, h))
    scale, bias = ner_stats(q, r, tau=tau).solve_affine(lam, gamma)
    for ch in range(c):
        qc, rc = q[:, ch].numpy().ravel(), r[:, ch].numpy().ravel()
        best = minimize(lambda kc: ner_loss(kc[0], qc, rc, lam, gamma, tau, kc[1] / kc[0]), x0=[1.0, 0.0],
                        method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 4000})
        closed = ner_loss(scale[ch].item(), qc, rc, lam, gamma, tau, bias[ch].item())
        assert closed <= best.fun + 1e-7 * (1 + abs(best.fun))
        assert closed <= ner_loss(ner_scale(q, r, lam=lam, gamma=gamma, tau=tau)[ch].item(), qc, rc, lam, gamma,
                                  tau) + 1e-12, "a bias never fits worse than the scale alone"


def test_ner_bias_recovers_an_affine_distortion() -> None:
    _, r = pair(5, (4, 3, 6, 6))
    offsets = torch.tensor([0.3, -0.2, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    q = r / 1.25 + offsets  # K = 1.25, b = offsets undo it exactly
    scale, bias = ner_stats(q, r, tau=0.5).solve_affine(0.4, 0.0)
    torch.testing.assert_close(scale, torch.full((3,), 1.25, dtype=torch.float64))
    torch.testing.assert_close(bias, offsets.flatten())


def test_ner_scale_is_one_when_estimates_match() -> None:
    _, r = pair(1, (4, 3, 5, 5))
    assert torch.equal(ner_scale(r, r, lam=0.3, gamma=0.1, tau=0.5), torch.ones(3, dtype=torch.float64))


def test_degenerate_channel_gets_unit_scale() -> None:
    q, r = torch.zeros(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    assert ner_scale(q, r, lam=0.5, gamma=0.0, tau=0.1).item() == 1.0


@pytest.mark.parametrize("bad", [dict(lam=1.5), dict(gamma=-1.0), dict(tau=-0.1)])
def test_bad_hyperparameters_raise(bad: dict[str, float]) -> None:
    q, r = pair(0, (2, 2, 3, 3))
    with pytest.raises(ValueError, match=next(iter(bad))):
        ner_scale(q, r, **{**dict(lam=0.5, gamma=0.0, tau=0.1), **bad})


def test_streamed_two_pass_equals_one_shot() -> None:
    q, r = pair(2, (12, 3, 6, 6))
    chunks = list(zip(q.split(5), r.split(5)))
    absmean = AbsMean.empty(3)
    for _, rc in chunks:
        absmean.update(rc)
    assert torch.allclose(absmean.mean() * 0.7, mask_threshold(r, 0.7))
    stats = NERStats.empty(0.7 * absmean.mean())
    for qc, rc in chunks:
        stats.update(qc, rc)
    whole = ner_stats(q, r, tau=0.7)
    for name in ("s_qr", "s_qq", "n", "s_q_r", "s_qq_rr", "n_mask"):
        assert torch.allclose(getattr(stats, name), getattr(whole, name), rtol=1e-12), name
    assert torch.allclose(stats.solve(0.4, 0.1), ner_scale(q, r, lam=0.4, gamma=0.1, tau=0.7), rtol=1e-12)


def test_two_halves_merge_by_addition() -> None:
    q, r = pair(3, (10, 2, 4, 4))
    threshold = mask_threshold(r, 0.5)
    halves = [NERStats.empty(threshold).update(q[s], r[s]) for s in (slice(0, 4), slice(4, 10))]
    merged, whole = halves[0] + halves[1], NERStats.empty(threshold).update(q, r)
    assert torch.allclose(merged.solve(0.5, 0.0), whole.solve(0.5, 0.0), rtol=1e-12)
    assert torch.equal(merged.n_mask, whole.n_mask)
    assert torch.allclose((AbsMean.empty(2).update(r[:4]) + AbsMean.empty(2).update(r[4:])).mean(),
                          AbsMean.empty(2).update(r).mean())
    with pytest.raises(ValueError, match="threshold"):
        _ = halves[0] + NERStats.empty(threshold * 2)


@pytest.mark.parametrize("granularity, shape", [("channel", (3,)), ("element", (3, 4, 5))])
def test_input_bias_means(granularity: str, shape: tuple[int, ...]) -> None:
    x = torch.randn(6, 3, 4, 5)
    shift = torch.arange(3.0).view(1, 3, 1, 1) + torch.randn(1, 1, 4, 5)
    mu = input_bias(x + shift, x, granularity)
    assert mu.shape == shape
    expected = shift[0].mean((1, 2)) if granularity == "channel" else shift[0]
    assert torch.allclose(mu.float(), expected, atol=1e-6)
    assert not input_bias(x, x, granularity).any()
    with pytest.raises(ValueError, match="granularity"):
        input_bias(x, x, "pixel")  # type: ignore[arg-type]


def _biased(shift: torch.Tensor, noise: float, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` pairs whose differences are ``shift`` plus Gaussian noise of standard deviation ``noise``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(count, *shift.shape, generator=gen, dtype=torch.float64)
    return x + shift + noise * torch.randn(count, *shift.shape, generator=gen, dtype=torch.float64), x


def test_shrunk_input_bias_is_closer_to_the_truth_than_element_means_when_they_are_noisy() -> None:
    """James-Stein: a flat channel (true bias constant) collapses to its mean; a real spatial pattern far above
    the noise keeps it; averaged over draws the shrunk estimate's error is below the raw element means'."""
    flat = torch.full((1, 8, 8), 0.3, dtype=torch.float64)
    pattern = torch.linspace(-2, 2, 64, dtype=torch.float64).view(1, 8, 8)
    truth = torch.cat([flat, pattern])
    errors = {"element": 0.0, "shrunk": 0.0}
    for seed in range(20):
        x_hat, x = _biased(truth, noise=1.0, count=16, seed=seed)
        for granularity in errors:
            errors[granularity] += (input_bias(x_hat, x, granularity) - truth).square().sum().item()
    assert errors["shrunk"] < 0.6 * errors["element"]
    x_hat, x = _biased(truth, noise=1.0, count=16, seed=0)
    shrunk, element = input_bias(x_hat, x, "shrunk"), input_bias(x_hat, x, "element")
    assert shrunk[0].std() < 0.5 * element[0].std(), "the flat channel collapses towards its mean"
    assert torch.corrcoef(torch.stack([shrunk[1].flatten(), pattern.flatten()]))[0, 1] > 0.95, "the pattern stays"
    exact, y = _biased(truth, noise=0.0, count=4, seed=0)
    torch.testing.assert_close(input_bias(exact, y, "shrunk"), truth)  # no noise: nothing to shrink


def test_ptqd_fit_recovers_a_linear_model_and_is_identity_on_equal_estimates() -> None:
    _, r = pair(4, (20, 2, 8, 8))
    noise = 0.1 * torch.randn(r.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q = 1.25 * r + torch.tensor([0.2, -0.3], dtype=torch.float64).view(1, 2, 1, 1) + noise
    slope, bias, var = ptqd_fit(q, r)
    assert slope.item() == pytest.approx(1.25, abs=0.01)
    assert torch.allclose(bias, torch.tensor([0.2, -0.3], dtype=torch.float64), atol=0.01)
    assert var.item() == pytest.approx(0.01 / 1.25 ** 2, rel=0.1)
    slope, bias, var = ptqd_fit(r, r)
    assert slope.item() == 1.0 and not bias.any() and var.item() == pytest.approx(0.0, abs=1e-12)
    halves = PTQDStats.empty(2).update(q[:7], r[:7]) + PTQDStats.empty(2).update(q[7:], r[7:])
    assert torch.allclose(halves.solve()[1], ptqd_fit(q, r)[1], rtol=1e-10)
