"""What the issue-18 bench scripts share: each style's strict judge, from the project's own
registries (the validation domains' judges in :data:`dprdm.validation.DOMAINS`, OpenMoji's strict
network in the evaluation classifiers), as a function uint8 images -> P(that style)."""

from __future__ import annotations

from typing import Callable

import numpy as np

from dprdm.evaluation.classifiers import AGAINST_PUBLIC_AND_AUGMENTATIONS, EvalClassifiers
from dprdm.evaluation.judge import StyleJudge
from dprdm.validation import DOMAINS

Judge = Callable[[np.ndarray], np.ndarray]


def validation_judge(domain: str) -> Judge:
    """The shipped judge of validation domain `domain` (``fluent_hc``, ``emojione``)."""
    return StyleJudge.from_pretrained(DOMAINS[domain].judge_dir).probability


def openmoji_judge(classifiers: EvalClassifiers | None = None) -> Judge:
    """The strict OpenMoji network (OpenMoji vs the public styles and their augmentations)."""
    classifiers = classifiers or EvalClassifiers.from_pretrained()
    return lambda images: classifiers.openmoji_probability(
        images, against=AGAINST_PUBLIC_AND_AUGMENTATIONS)
