"""FID and KID for Fashion-MNIST in two independent feature spaces of small bundled classifiers.

Each feature space is a classifier trained by ``benchmarks/fid_reference.py`` with its own architecture
and seed, shipped in ``tacdiff/assets/fid/`` with the Fashion-MNIST test split's reference statistics:
``cnn`` (the default, reported as ``fid``/``kid``) and ``allconv`` (reported as ``fid_allconv``/``kid_allconv``).
Two spaces guard against one network's blind spots: when they disagree about a gap's size, neither alone
is enough. Scores live in their classifier's feature space: compare them with each other, not with
Inception FID (for that, see :func:`inception_fid`).
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from tacdiff.data import to_uint8
from tacdiff.data.fashion_mnist import to_canvas
from tacdiff.io.atomic import write_file_atomically
from tacdiff.io.formats import read_safetensors, save_safetensors

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "fid"
CLASSIFIER_FORMAT = "tacdiff-fid-classifier/1"
REFERENCE_FORMAT = "tacdiff-fid-reference/1"
IMAGE_SHAPE = (1, 28, 28)
_REGENERATE = "regenerate it with `python benchmarks/fid_reference.py`"


@dataclass(frozen=True)
class FeatureSpace:
    """A bundled FID/KID feature space: its classifier weights and test-split reference in ``folder``."""

    name: str
    folder: Path

    @property
    def weights(self) -> Path:
        return self.folder / "classifier.safetensors"

    @property
    def reference(self) -> Path:
        return self.folder / "reference_test.safetensors"

    @property
    def suffix(self) -> str:
        """What result keys carry after ``fid``/``kid``: nothing for the default space, ``_<name>`` otherwise."""
        return "" if self is FEATURE_SPACES[DEFAULT_SPACE] else f"_{self.name}"


DEFAULT_SPACE = "cnn"
FEATURE_SPACES = {name: FeatureSpace(name, folder) for name, folder in
                  (("cnn", ASSET_DIR), ("allconv", ASSET_DIR / "allconv"))}
WEIGHTS_PATH = FEATURE_SPACES[DEFAULT_SPACE].weights
REFERENCE_PATH = FEATURE_SPACES[DEFAULT_SPACE].reference


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(), nn.MaxPool2d(2))


class FashionClassifier(nn.Module):
    """Small CNN: images ``(N, 1, 28, 28)`` in [-1, 1] -> logits ``(N, 10)``.

    ``features(x)`` gives the penultimate ReLU layer ``(N, num_features)`` used for FID/KID.
    """

    def __init__(self, num_features: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _block(1, 32), _block(32, 64), _block(64, 64),  # 28 -> 14 -> 7 -> 3
            nn.Flatten(), nn.Linear(64 * 3 * 3, num_features), nn.ReLU())
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class AllConvClassifier(nn.Module):
    """The second feature space's network, unlike :class:`FashionClassifier` in depth, width and design: five
    3x3 convolutions (strided instead of max-pooled, GELU), widths up to 192, global average pooling.

    ``features(x)`` gives the pooled ``(N, num_features)`` vector used for FID/KID; ``forward`` the logits.
    """

    def __init__(self, num_features: int = 192, num_classes: int = 10) -> None:
        super().__init__()
        widths = (1, 32, 64, 128, 128, num_features)
        strides = (1, 2, 2, 1, 2)  # 28 -> 28 -> 14 -> 7 -> 7 -> 4
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip(widths, widths[1:], strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


ARCHITECTURES: dict[str, type[FashionClassifier] | type[AllConvClassifier]] = {
    "cnn": FashionClassifier, "allconv": AllConvClassifier}
"""Classifier classes by the ``architecture`` their weights file records (files without one are ``cnn``)."""


class FeatureExtractor(nn.Module):
    """Frozen classifier features, shaped for torchmetrics' ``feature=`` argument.

    Maps float ``(N, 1, 28, 28)`` in [-1, 1] to float32 ``(N, num_features)``. The
    ``num_features`` attribute spares torchmetrics its uint8 dummy forward.
    """

    def __init__(self, classifier: FashionClassifier | AllConvClassifier, weights_sha256: str) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.head.in_features
        self.weights_sha256 = weights_sha256

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images.float())


class _FeatureInput(nn.Identity):
    """Lets torchmetrics take features we already extracted."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features


def _read(path: str | Path, fmt: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    meta, tensors = read_safetensors(path, kind=f"{fmt} file", fmt=fmt, fix=f"reinstall tacdiff or {_REGENERATE}")
    return tensors, meta


def load_feature_extractor(path: str | Path = WEIGHTS_PATH) -> FeatureExtractor:
    """Load the bundled (or a given) classifier weights as a :class:`FeatureExtractor` on CPU; the file's
    ``architecture`` metadata picks the class from :data:`ARCHITECTURES`."""
    state, meta = _read(path, CLASSIFIER_FORMAT)
    architecture = meta.get("architecture", DEFAULT_SPACE)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{path} holds a {architecture!r} classifier; tacdiff knows {', '.join(ARCHITECTURES)}")
    classifier = ARCHITECTURES[architecture](int(meta["num_features"]))
    classifier.load_state_dict(state)
    return FeatureExtractor(classifier, hashlib.sha256(Path(path).read_bytes()).hexdigest())


def _check_images(images: Tensor, name: str) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"{name} must have shape (N, 1, 28, 28), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be float in [-1, 1], got {images.dtype}; "
                         "convert uint8 images with tacdiff.data.to_model_space")
    if images.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 images, got {images.shape[0]}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains NaN or inf")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.0 or hi > 1.0:
        raise ValueError(f"{name} must lie in [-1, 1], got [{lo:.4g}, {hi:.4g}]; clamp with .clamp(-1, 1)")


def extract_features(images: Tensor, *, extractor: FeatureExtractor | None = None,
                     batch_size: int = 500) -> Tensor:
    """Features of ``images`` ``(N, 1, 28, 28)`` float in [-1, 1] -> float32 ``(N, D)`` on CPU."""
    _check_images(images, "images")
    extractor = extractor or load_feature_extractor()
    device = next(extractor.parameters()).device
    with torch.no_grad():
        return torch.cat([extractor(b.to(device)).cpu() for b in images.split(batch_size)])


LOCAL_METRIC = {"sync_on_compute": False}
"""torchmetrics options: under torchrun every process holds all images (:mod:`tacdiff.distributed` gathers them),
so torchmetrics must not add the other processes' copies."""


def _fid_state(features: Tensor) -> dict[str, Tensor]:
    """The sufficient statistics torchmetrics keeps for the real set (sum, outer-product sum, count)."""
    metric = FrechetInceptionDistance(feature=_FeatureInput(features.shape[1]), **LOCAL_METRIC)
    metric.update(features.double(), real=True)
    return {k: getattr(metric, k) for k in
            ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")}


def save_reference(images: Tensor, path: str | Path, *, extractor: FeatureExtractor | None = None,
                   batch_size: int = 500, metadata: dict[str, str] | None = None) -> None:
    """Save a reusable reference for :func:`fid_kid` from real ``images`` ``(N, 1, 28, 28)`` in [-1, 1].

    Stores the FID statistics in float64 and the KID features in float16, tied by
    ``weights_sha256`` to the extractor that made them. The file is written atomically.
    """
    extractor = extractor or load_feature_extractor()
    features = extract_features(images, extractor=extractor, batch_size=batch_size)
    if not torch.isfinite(features.half()).all():
        raise ValueError("features overflow float16; this reference cannot be stored")
    meta = {**(metadata or {}), "format": REFERENCE_FORMAT, "weights_sha256": extractor.weights_sha256,
            "num_samples": str(features.shape[0]), "num_features": str(features.shape[1])}
    tensors = {**_fid_state(features), "features": features.half()}
    write_file_atomically(path, lambda tmp: save_safetensors(tensors, tmp, meta))


def _load_reference(path: str | Path, extractor: FeatureExtractor) -> tuple[dict[str, Tensor], Tensor]:
    tensors, meta = _read(path, REFERENCE_FORMAT)
    if meta.get("weights_sha256") != extractor.weights_sha256:
        raise ValueError(f"{path} was made with classifier {meta.get('weights_sha256', '?')[:12]}, "
                         f"not the loaded {extractor.weights_sha256[:12]}; {_REGENERATE}")
    return tensors, tensors.pop("features").float()


def _fid(real_state: dict[str, Tensor], fake: Tensor) -> float:
    metric = FrechetInceptionDistance(feature=_FeatureInput(fake.shape[1]), **LOCAL_METRIC)
    for name, value in real_state.items():
        setattr(metric, name, value.clone())
    metric.update(fake.double(), real=False)
    return metric.compute().item()


def _kid(real: Tensor, fake: Tensor, subsets: int, subset_size: int, seed: int) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features")
        metric = KernelInceptionDistance(feature=_FeatureInput(fake.shape[1]), subsets=subsets,
                                         subset_size=subset_size, **LOCAL_METRIC)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return {"kid": mean.item(), "kid_std": std.item()}


def fid_kid(samples: Tensor, *, reference: Tensor | str | Path | None = None,
            extractor: FeatureExtractor | None = None, batch_size: int = 500,
            kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """FID and KID of ``samples`` against real Fashion-MNIST, on the classifier's features.

    Args:
        samples: generated images ``(N, 1, 28, 28)``, float in [-1, 1] (the model's output space).
        reference: real images ``(M, 1, 28, 28)`` in [-1, 1], a file from :func:`save_reference`,
            or ``None`` for the bundled Fashion-MNIST test split (10000 images).
        extractor: from :func:`load_feature_extractor`; loaded when ``None``.
        batch_size: images per forward pass of the classifier.
        kid_subsets, kid_subset_size: KID averages the unbiased polynomial-kernel MMD² over
            ``kid_subsets`` random subsets of ``kid_subset_size`` (≤ N and ≤ M) from each set.
        seed: seeds the KID subsets; the global RNG is left untouched.

    Returns:
        ``{"fid", "kid", "kid_std"}`` as floats, in squared feature units (lower is better).
    """
    _check_images(samples, "samples")
    if isinstance(reference, Tensor):
        _check_images(reference, "reference")
    if not 2 <= kid_subset_size <= samples.shape[0]:
        raise ValueError(f"kid_subset_size must be in 2..N={samples.shape[0]} (the number of samples), "
                         f"got {kid_subset_size}; lower it or pass more samples")
    extractor = extractor or load_feature_extractor()
    if isinstance(reference, Tensor):
        real = extract_features(reference, extractor=extractor, batch_size=batch_size)
        real_state = _fid_state(real)
    else:
        real_state, real = _load_reference(REFERENCE_PATH if reference is None else reference, extractor)
    if kid_subset_size > real.shape[0]:
        raise ValueError(f"kid_subset_size={kid_subset_size} exceeds the {real.shape[0]} reference images")
    fake = extract_features(samples, extractor=extractor, batch_size=batch_size)
    return {"fid": _fid(real_state, fake), **_kid(real, fake, kid_subsets, kid_subset_size, seed)}


def inception_fid(samples: Tensor, reference: Tensor, *, weights_path: str | Path,
                  batch_size: int = 100) -> float:
    """Standard FID (Inception-v3 pool3, 2048-d) of ``samples`` against ``reference``.

    Both are ``(N, 1, 28, 28)`` float in [-1, 1]; they are turned into uint8 RGB and resized to
    299x299 by torchmetrics. Needs ``pip install "tacdiff[inception]"`` (torchvision and
    torch-fidelity built for your torch) and a local ``weights_path`` such as torch-fidelity's
    ``pt_inception-2015-12-05-6726825d.pth``; nothing is downloaded.
    """
    try:
        import torch_fidelity  # noqa: F401
        import torchvision  # noqa: F401
    except (ImportError, OSError, RuntimeError) as err:
        raise ImportError(f"inception_fid needs torchvision and torch-fidelity ({err}): "
                          f'pip install "tacdiff[inception]" with a torchvision that matches '
                          f"torch {torch.__version__}") from None
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f"Inception weights not found at {weights_path}; pass weights_path= "
                                "a local pt_inception-2015-12-05-6726825d.pth (no download is attempted)")
    _check_images(samples, "samples")
    _check_images(reference, "reference")
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights_path),
                                      **LOCAL_METRIC)
    for images, real in ((reference, True), (samples, False)):
        for batch in images.split(batch_size):
            metric.update(to_uint8(batch).unsqueeze(1).expand(-1, 3, -1, -1).contiguous(), real=real)
    return metric.compute().item()


KID_SUBSET_SIZE = 1000


def fid_ready(shape: tuple[int, ...]) -> bool:
    """Whether :func:`fid_or_note` scores images of ``shape``: grayscale, at least 28x28."""
    return len(shape) == 3 and shape[0] == 1 and min(shape[1:]) >= IMAGE_SHAPE[-1]


SCORE_KEYS = tuple(f"{metric}{space.suffix}" for space in FEATURE_SPACES.values()
                   for metric in ("fid", "kid", "kid_std"))
"""What :func:`fid_or_note` returns: FID, KID and KID's spread in each bundled feature space."""
FID_KEYS = tuple(key for key in SCORE_KEYS if not key.startswith("kid_std"))
"""The scores a table row shows: FID and KID in each feature space."""


def fid_or_note(images: list[Tensor], shape: tuple[int, ...],
                seed: int) -> tuple[dict[str, float | None], str | None]:
    """FID/KID of ``images`` of ``shape`` in every bundled feature space (:data:`SCORE_KEYS`), or ``None`` scores
    and why not.

    Images larger than 28x28 are centre-cropped to it: the latent reference pipeline makes Fashion-MNIST
    images padded with background to 32x32, so the crop recovers the test split's framing and its
    bundled reference statistics apply.
    """
    empty: dict[str, float | None] = dict.fromkeys(SCORE_KEYS)
    if not fid_ready(shape):
        return empty, (f"FID skipped: it needs grayscale Fashion-MNIST-domain samples of at least 28x28, this model "
                       f"makes {shape}")
    samples = to_canvas(torch.cat(images), IMAGE_SHAPE[-1])
    if samples.shape[0] < 2:
        return empty, "FID skipped: it needs at least 2 samples"
    scores: dict[str, float | None] = {}
    for space in FEATURE_SPACES.values():
        found = fid_kid(samples, reference=space.reference, extractor=load_feature_extractor(space.weights),
                        kid_subset_size=min(KID_SUBSET_SIZE, samples.shape[0]), seed=seed)
        scores.update({f"{key}{space.suffix}": value for key, value in found.items()})
    return scores, None
