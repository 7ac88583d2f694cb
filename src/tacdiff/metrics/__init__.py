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

__all__ = [
    "FashionClassifier",
    "FeatureExtractor",
    "extract_features",
    "fid_kid",
    "inception_fid",
    "load_feature_extractor",
    "save_reference",
]
