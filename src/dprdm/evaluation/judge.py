"""A style judge for a validation domain, and the evaluation classifiers that use it.

Owns :class:`StyleJudge` -- one small style network (the strict OpenMoji network's architecture)
that tells one TARGET style (a validation domain's held-out style) from everything a generator
may be trained on -- and :class:`JudgedClassifiers`, the demo's concept network with such a judge
in place of the OpenMoji style networks (what ``dprdm eval --demo --validation`` scores with).

The shipped judges, one per :data:`dprdm.validation.DOMAINS` entry (trained by ``python -m
dprdm.evaluation.train_classifiers --target NAME``): ``dprdm/weights/validation-judge-fluent-hc``
(Fluent High Contrast, the default) and ``dprdm/weights/validation-judge`` (EmojiOne), each the
held-out style against its domain's public splits as they are, through the seven augmentations
of :mod:`dprdm.data.styles` and through the recipes of
:func:`dprdm.data.style_family.style_family`. A directory holds ``config.json`` (architecture,
target, what it was trained against), ``model.safetensors`` (float16 on disk) and
``training.json`` (settings and measured accuracies).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from dprdm.errors import InvalidParameterError
from dprdm.evaluation.classifiers import (AGAINST_PUBLIC_AND_AUGMENTATIONS, BATCH_SIZE,
                                          CONFIG_NAME, IMAGE_SIZE, TRAINING_NAME, WEIGHTS_NAME,
                                          ClassifierLoadError, ConvNet, EvalClassifiers,
                                          to_input)
from dprdm.validation import DEFAULT_DOMAIN, DOMAINS

VALIDATION_JUDGE_DIR = DOMAINS[DEFAULT_DOMAIN].judge_dir  # the default domain's judge
MODEL_TYPE = "dprdm-style-judge"
FORMAT_VERSION = 1
HEAD = "target"


class StyleJudge:
    """P(target style) of ``uint8 (N, H, W, 3)`` images (any side; resized like the classifiers)."""

    def __init__(self, target: str, channels: tuple[int, ...] = (16, 32, 64, 128),
                 net: ConvNet | None = None, against: list[str] | None = None,
                 image_size: int = IMAGE_SIZE) -> None:
        if not target:
            raise InvalidParameterError("a style judge needs a target style name")
        self.target = target
        self.channels = tuple(int(c) for c in channels)
        self.against = list(against or [])
        self.image_size = int(image_size)
        self.net = (net or ConvNet(self.channels, {HEAD: 1})).eval()
        self.path: Path | None = None

    def config(self) -> dict:
        return {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION,
                "target": self.target, "channels": list(self.channels),
                "against": self.against, "image_size": self.image_size}

    @torch.no_grad()
    def _run(self, images: np.ndarray, features: bool) -> np.ndarray:
        x = to_input(images, self.image_size)
        width = self.channels[-1] if features else 1
        out = [(self.net.features(x[i:i + BATCH_SIZE]) if features
                else self.net(x[i:i + BATCH_SIZE])[HEAD]).float()
               for i in range(0, len(x), BATCH_SIZE)]
        return torch.cat(out).numpy() if out else np.zeros((0, width), np.float32)

    def probability(self, images: np.ndarray) -> np.ndarray:
        """float32 (N,): P(the target style)."""
        logits = self._run(images, features=False)[:, 0].astype(np.float64)
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)

    def features(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, channels[-1]): the pooled features (FID / KID in the judge's space)."""
        return self._run(images, features=True).astype(np.float32)

    def save_pretrained(self, directory: str | os.PathLike, record: dict | None = None) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {key: (value.detach().cpu().half() if value.is_floating_point()
                       else value.detach().cpu()).contiguous()
                 for key, value in self.net.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(self.config(), indent=1) + "\n",
                                             encoding="utf-8")
        if record is not None:
            (directory / TRAINING_NAME).write_text(json.dumps(record, indent=2) + "\n",
                                                     encoding="utf-8")
        return directory

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = VALIDATION_JUDGE_DIR) -> StyleJudge:
        """Load from a local directory (the shipped validation judge by default)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(path)
        config_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights.is_file():
            raise ClassifierLoadError(
                f"no style judge at {directory} (need {CONFIG_NAME} and {WEIGHTS_NAME}; train "
                f"it with `python -m dprdm.evaluation.train_classifiers --target DOMAIN`)")
        try:
            config = json.loads(config_path.read_text("utf-8"))
            if config.get("model_type") != MODEL_TYPE:
                raise ValueError(f"model_type {config.get('model_type')!r}")
            if config.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
                raise ValueError(f"format {config['format_version']} is newer than this dprdm's")
            judge = cls(str(config["target"]), tuple(config["channels"]),
                        against=config.get("against"),
                        image_size=int(config.get("image_size", IMAGE_SIZE)))
            state = {k: v.float() if v.is_floating_point() else v
                     for k, v in load_file(str(weights)).items()}
            judge.net.load_state_dict(state)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError,
                SafetensorError) as error:
            raise ClassifierLoadError(f"cannot read the style judge at {directory}: "
                                      f"{str(error).splitlines()[0]}") from None
        judge.net.eval()
        judge.path = directory
        return judge


class JudgedClassifiers:
    """The demo's concept network with a style judge as its only style network.

    Presents the interface the evaluation harness uses (``concept_logits``, ``features``, ...):
    concept and feature calls go to `base`; ``openmoji_probability(images,
    against="public-and-augmentations")`` and ``style_features`` of it answer with the judge
    (the "strict" style columns, relabelled with :attr:`style_target`). There is no
    public-styles counterpart, so :attr:`style_networks` names the strict one only.
    """

    style_networks = (("_strict", AGAINST_PUBLIC_AND_AUGMENTATIONS),)
    has_public_styles_net = False

    def __init__(self, base: EvalClassifiers, judge: StyleJudge) -> None:
        self.base = base
        self.judge = judge
        self.style_target = judge.target
        self.config = base.config

    def __getattr__(self, name: str):  # concept_logits, category_logits, features, concepts...
        if name in ("base", "judge"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def describe(self) -> str:
        return self.base.describe()

    def _check(self, against: str) -> None:
        if against != AGAINST_PUBLIC_AND_AUGMENTATIONS:
            raise ClassifierLoadError(
                f"the {self.style_target} judge has no {against!r} network; only the strict one "
                f"({AGAINST_PUBLIC_AND_AUGMENTATIONS!r})")

    def openmoji_probability(self, images: np.ndarray,
                             against: str = AGAINST_PUBLIC_AND_AUGMENTATIONS) -> np.ndarray:
        """P(the judge's target style) (the name is the harness's; the target is not OpenMoji)."""
        self._check(against)
        return self.judge.probability(images)

    def style_features(self, images: np.ndarray,
                       against: str = AGAINST_PUBLIC_AND_AUGMENTATIONS) -> np.ndarray:
        self._check(against)
        return self.judge.features(images)
