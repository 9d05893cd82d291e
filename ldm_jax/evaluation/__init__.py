"""Sample-quality evaluation: feature networks (FID Inception) and streaming statistics.

``inception``: :class:`FeatureExtractor` (the interface every feature network offers) and the
FID Inception-v3 of pytorch-fid / TF-FID in Flax with a loader for its public weight file.
``statistics``: streaming feature moments, FID, Inception Score, precision/recall and cached
reference statistics.
"""

from ldm_jax.evaluation.inception import (FeatureExtractor, FIDInceptionV3,
                                          load_inception_extractor)
from ldm_jax.evaluation.statistics import (FeatureMoments, cached_reference_moments,
                                           frechet_distance, inception_score, precision_recall)

__all__ = ["FeatureExtractor", "FIDInceptionV3", "load_inception_extractor", "FeatureMoments",
           "cached_reference_moments", "frechet_distance", "inception_score",
           "precision_recall"]
