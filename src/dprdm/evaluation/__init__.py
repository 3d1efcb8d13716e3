"""Measuring generated images: the evaluation classifiers and the metrics built on them.

* :mod:`dprdm.evaluation.classifiers` -- :class:`EvalClassifiers`: a concept + category network
  trained on PUBLIC emoji only (also the default feature space of FID / KID / PRDC) and a style
  network that tells OpenMoji from the public styles. Shipped in ``dprdm/weights/eval-classifiers``.
* :mod:`dprdm.evaluation.metrics` -- FID / KID (torchmetrics), precision / recall / density /
  coverage, concept and style scores, text-image alignment, InceptionV3 from a local file.
* :mod:`dprdm.evaluation.look` -- pixel statistics of the look (outline weight, fill lightness,
  saturation and flatness) for what a reviewer checks by eye.
* :mod:`dprdm.evaluation.train_classifiers` -- how the shipped classifiers were trained and
  measured (``python -m dprdm.evaluation.train_classifiers``).

Nothing here is used by generation, and nothing downloads.
"""

from dprdm.evaluation.classifiers import DEFAULT_DIR, ClassifierLoadError, EvalClassifiers
from dprdm.evaluation.look import look_statistics
from dprdm.evaluation.metrics import (InceptionUnavailableError, alignment_score, concept_scores,
                                      distribution_metrics, inception_extractor,
                                      paired_kid_difference, prdc, style_scores)

__all__ = [
    "DEFAULT_DIR",
    "ClassifierLoadError",
    "EvalClassifiers",
    "InceptionUnavailableError",
    "alignment_score",
    "concept_scores",
    "distribution_metrics",
    "inception_extractor",
    "look_statistics",
    "paired_kid_difference",
    "prdc",
    "style_scores",
]
