"""FID/KID in two Fashion-MNIST feature spaces, prompt accuracy, paired trajectory errors."""

from tacdiff.metrics.fid import (
    FEATURE_SPACES,
    AllConvClassifier,
    FashionClassifier,
    FeatureExtractor,
    extract_features,
    fid_kid,
    inception_fid,
    load_feature_extractor,
    save_reference,
)
from tacdiff.metrics.paired import PairedErrors, PairedStepStats, paired_errors, psnr_db, psnr_gap, sqnr_db
from tacdiff.metrics.prompt_accuracy import prompt_accuracy

__all__ = [
    "FEATURE_SPACES",
    "AllConvClassifier",
    "FashionClassifier",
    "FeatureExtractor",
    "PairedErrors",
    "PairedStepStats",
    "extract_features",
    "fid_kid",
    "inception_fid",
    "load_feature_extractor",
    "paired_errors",
    "prompt_accuracy",
    "psnr_db",
    "psnr_gap",
    "save_reference",
    "sqnr_db",
]
