"""Domain FID/KID: both bundled feature spaces and their references, agreement with independent math, bad inputs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file, save_file

from tacdiff.data import load_fashion_mnist, to_model_space
from tacdiff.data.fashion_mnist import DEFAULT_DATA_DIR
from tacdiff.metrics import (FeatureExtractor, extract_features, fid_kid, inception_fid, load_feature_extractor,
                             save_reference)
from tacdiff.metrics.fid import FEATURE_SPACES, SCORE_KEYS, FeatureSpace

N = 1000


@pytest.fixture(scope="module")
def splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """2000 test and 1000 train images in model space, with labels; skipped locally if absent, CI fails."""
    if not (DEFAULT_DATA_DIR / "train-images-idx3-ubyte.gz").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"Fashion-MNIST missing at {DEFAULT_DATA_DIR} on CI: "
                        "apt-get install dataset-fashion-mnist")
        pytest.skip("dataset-fashion-mnist not installed")
    out = {}
    for split, n in (("test", 2 * N), ("train", N)):
        images, labels = load_fashion_mnist(split)
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
        out[split] = to_model_space(images[idx]), labels[idx]
    return out


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return load_feature_extractor()


@pytest.fixture(scope="module", params=list(FEATURE_SPACES))
def space(request: pytest.FixtureRequest) -> tuple[FeatureSpace, FeatureExtractor]:
    """Each bundled feature space with its loaded extractor."""
    found = FEATURE_SPACES[request.param]
    return found, load_feature_extractor(found.weights)


def noise(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1


def scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def unbiased_poly_mmd(a: np.ndarray, b: np.ndarray) -> float:
    """MMD² with k(x, y) = (x·y / d + 1)³, diagonal terms left out of the within-set means."""
    def k(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / a.shape[1] + 1) ** 3
    m = len(a)
    k_aa, k_bb = k(a, a), k(b, b)
    within = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(within - 2 * k(a, b).mean())


def test_classifier_accuracy(splits, space):
    images, labels = splits["test"]
    with torch.no_grad():
        preds = space[1].classifier(images).argmax(1)
    assert (preds == labels).float().mean().item() >= 0.90


def test_data_scores_small_noise_scores_large(splits, space):
    found, extractor = space
    train = splits["train"][0]
    data = fid_kid(train, reference=found.reference, extractor=extractor, kid_subsets=10, kid_subset_size=500)
    rand = fid_kid(noise(N), reference=found.reference, extractor=extractor, kid_subsets=10, kid_subset_size=500)
    # cnn: data ~1.1, noise ~380 (FID); KID data ~-0.5 +- 0.7, noise ~105; allconv: FID 0.24 vs 90, KID ~0 vs 1.6
    assert rand["fid"] > 100 * data["fid"]
    assert rand["kid"] > 20 * (abs(data["kid"]) + data["kid_std"])


def test_the_feature_spaces_are_independent_networks(space):
    """The second space is another architecture with its own weights, not a copy of the first."""
    found, extractor = space
    first = load_feature_extractor()
    if found.name == "cnn":
        assert extractor.weights_sha256 == first.weights_sha256 and found.suffix == ""
        return
    assert type(extractor.classifier) is not type(first.classifier) and found.suffix == f"_{found.name}"
    assert extractor.num_features != first.num_features and extractor.weights_sha256 != first.weights_sha256
    assert len(list(extractor.classifier.modules())) != len(list(first.classifier.modules()))


# ReLU units that never fire on real images make the covariances singular; sqrtm still converges.
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_fid_kid_match_independent_math(splits, extractor):
    test, train = splits["test"][0][:N], splits["train"][0]
    scores = fid_kid(train, reference=test, extractor=extractor, kid_subsets=1, kid_subset_size=N)
    a = extract_features(train, extractor=extractor).double().numpy()
    b = extract_features(test, extractor=extractor).double().numpy()
    assert scores["fid"] == pytest.approx(scipy_fid(a, b), rel=1e-3)
    # a subset of all N samples is a permutation, which leaves the unbiased MMD unchanged
    assert scores["kid"] == pytest.approx(unbiased_poly_mmd(a, b), rel=1e-6, abs=1e-9)
    assert scores["kid_std"] == 0.0


def test_kid_seeded(splits, extractor):
    train, ref = splits["train"][0][:500], splits["test"][0][:500]
    scores = [fid_kid(train, reference=ref, extractor=extractor, kid_subsets=5, kid_subset_size=200, seed=s)
              for s in (0, 0, 1)]
    assert scores[0] == scores[1] and scores[0]["kid"] != scores[2]["kid"]


def test_bundled_reference_matches_test_split(splits, space):
    found, extractor = space
    ref = load_file(found.reference)
    assert ref["real_features_num_samples"].item() == 10_000
    images, _ = load_fashion_mnist("test")
    feats = extract_features(to_model_space(images[:500]), extractor=extractor)
    torch.testing.assert_close(ref["features"][:500].float(), feats, rtol=2e-3, atol=2e-3)
    mean = ref["real_features_sum"] / 10_000
    torch.testing.assert_close(mean, ref["features"].double().mean(0), rtol=1e-3, atol=1e-3)


def test_saved_reference_round_trip(splits, extractor, tmp_path):
    train, test = splits["train"][0], splits["test"][0][:N]
    save_reference(test, tmp_path / "ref.safetensors", extractor=extractor)
    from_file = fid_kid(train, reference=tmp_path / "ref.safetensors", extractor=extractor,
                        kid_subsets=3, kid_subset_size=500)
    from_images = fid_kid(train, reference=test, extractor=extractor, kid_subsets=3, kid_subset_size=500)
    assert from_file["fid"] == pytest.approx(from_images["fid"], rel=1e-9)
    assert from_file["kid"] == pytest.approx(from_images["kid"], rel=1e-2, abs=1e-5)


@pytest.mark.parametrize(("images", "match"), [
    (torch.zeros(10, 28, 28), r"shape \(N, 1, 28, 28\)"),
    (torch.zeros(10, 3, 28, 28), r"shape \(N, 1, 28, 28\)"),
    (torch.zeros(10, 1, 28, 28, dtype=torch.uint8), "to_model_space"),
    (torch.full((10, 1, 28, 28), 2.0), r"\[-1, 1\]"),
    (torch.full((10, 1, 28, 28), float("nan")), "NaN"),
    (torch.zeros(1, 1, 28, 28), "at least 2"),
    (torch.zeros(10, 1, 28, 28), "kid_subset_size"),  # default subset of 1000 > 10 samples
])
def test_bad_samples_raise(images, match):
    with pytest.raises(ValueError, match=match):
        fid_kid(images)


def test_bad_reference_raises(extractor):
    x = torch.zeros(20, 1, 28, 28)
    with pytest.raises(ValueError, match="reference"):
        fid_kid(x, reference=torch.zeros(20, 28, 28), extractor=extractor, kid_subset_size=10)
    with pytest.raises(ValueError, match="exceeds the 5 reference"):
        fid_kid(x, reference=x[:5], extractor=extractor, kid_subset_size=10)


def test_missing_and_foreign_assets(extractor, tmp_path):
    with pytest.raises(FileNotFoundError, match="fid_reference.py"):
        load_feature_extractor(tmp_path / "missing.safetensors")
    x = torch.zeros(20, 1, 28, 28)
    with pytest.raises(FileNotFoundError, match="fid_reference.py"):
        fid_kid(x, reference=tmp_path / "missing.safetensors", extractor=extractor, kid_subset_size=10)
    save_file({"features": torch.zeros(20, 128)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="format"):
        fid_kid(x, reference=tmp_path / "foreign.safetensors", extractor=extractor, kid_subset_size=10)
    save_reference(x, tmp_path / "ref.safetensors", extractor=extractor)
    other = load_feature_extractor()
    other.weights_sha256 = "0" * 64
    with pytest.raises(ValueError, match="made with classifier"):
        fid_kid(x, reference=tmp_path / "ref.safetensors", extractor=other, kid_subset_size=10)


def test_inception_fid_explains_what_is_missing(tmp_path):
    x = torch.zeros(4, 1, 28, 28)
    with pytest.raises((ImportError, FileNotFoundError), match=r"tacdiff\[inception\]|Inception weights"):
        inception_fid(x, x, weights_path=tmp_path / "missing.pth")


def test_larger_grayscale_images_are_centre_cropped_for_fid(splits):
    """The latent reference makes test-split framing padded to 32x32: cropping back gives the same score."""
    from tacdiff.data.fashion_mnist import to_canvas
    from tacdiff.metrics.fid import fid_or_note

    images = splits["test"][0][:64]
    direct, _ = fid_or_note([images], (1, 28, 28), seed=0)
    padded, note = fid_or_note([to_canvas(images, 32)], (1, 32, 32), seed=0)
    assert note is None and padded == direct and set(direct) == set(SCORE_KEYS)
    assert all(direct[key] is not None for key in SCORE_KEYS) and direct["fid"] != direct["fid_allconv"]
    skipped, note = fid_or_note([images[..., :16, :16]], (1, 16, 16), seed=0)
    assert skipped["fid"] is None and "at least 28x28" in note
