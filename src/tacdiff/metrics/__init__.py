"""FID/KID on a Fashion-MNIST feature extractor, paired trajectory errors, timing."""

from tacdiff.metrics.fid import (
    FashionClassifier,
    FeatureExtractor,
    extract_features,
    fid_kid,
    inception_fid,
    load_feature_extractor,
    save_reference,
)
from tacdiff.metrics.paired import PairedErrors, PairedStepStats, paired_errors, psnr_db, sqnr_db

__all__ = [
    "FashionClassifier",
    "FeatureExtractor",
    "PairedErrors",
    "PairedStepStats",
    "extract_features",
    "fid_kid",
    "inception_fid",
    "load_feature_extractor",
    "paired_errors",
    "psnr_db",
    "save_reference",
    "sqnr_db",
]
