"""The evaluation classifiers: a PUBLIC concept/category network and two OpenMoji style networks.

Owns :class:`EvalClassifiers`, the measuring instrument of ``dprdm eval`` (trained by
:mod:`dprdm.evaluation.train_classifiers`, shipped in ``dprdm/weights/eval-classifiers``):

* the **concept network** -- a small CNN trained on the PUBLIC emoji only (Twemoji + Noto, each
  also drawn through the generic style augmentations of :mod:`dprdm.data.styles`). Two linear
  heads on one pooled feature vector: the concept (the caption, one class per public concept)
  and the emoji category. Its pooled features are the feature space of FID / KID / PRDC. It is
  independent of the generator's conditioning encoder (different network, different objective:
  plain supervised classification, no text tower).
* two **style networks** -- smaller CNNs that tell OpenMoji (the demo's private style) from the
  public data, with one logit each (P(OpenMoji)):

  - ``against="public-styles"`` (the default; ``style_public.*``): OpenMoji vs the public
    styles as they are (Twemoji + Noto). "OpenMoji-like" = more like OpenMoji than like
    Twemoji/Noto.
  - ``against="public-and-augmentations"`` (the strict one; ``style.*``): OpenMoji vs the public
    styles AND their style augmentations (outline, thick_stroke, ... -- everything the generator
    was trained on), so black outlines alone do not count.

  They have to see OpenMoji images to learn what OpenMoji looks like: demo-specific evaluation
  instruments, never used by generation.

Both take ``uint8 (N, H, W, 3)`` RGB on white; anything not 32 x 32 is resized with the
project's decoding path (:func:`dprdm.data.decode_image`). Inference is deterministic (eval
mode, no_grad, fixed batching). A checkpoint is a directory with ``config.json`` (architecture,
concept and category lists) and ``model.safetensors`` (keys ``concept.*``, ``style.*`` and
``style_public.*``, float16 on disk, float32 in memory). A directory written before the
public-styles network existed has no ``style_public_channels`` in its config: it loads, and only
``against="public-styles"`` raises :class:`ClassifierLoadError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dprdm.encoders.demo import ConvBlock  # conv3x3 -> BatchNorm -> ReLU, shared
from dprdm.errors import DprdmError, InvalidParameterError

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "weights" / "eval-classifiers"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TRAINING_NAME = "training.json"
MODEL_TYPE = "dprdm-eval-classifiers"
FORMAT_VERSION = 1
IMAGE_SIZE = 32
BATCH_SIZE = 256
AGAINST_PUBLIC_STYLES = "public-styles"  # OpenMoji vs Twemoji + Noto as they are (default)
AGAINST_PUBLIC_AND_AUGMENTATIONS = "public-and-augmentations"  # ... and their augmentations
AGAINST = (AGAINST_PUBLIC_STYLES, AGAINST_PUBLIC_AND_AUGMENTATIONS)


class ClassifierLoadError(DprdmError):
    """The evaluation classifiers could not be loaded (missing or mismatching files)."""

    code = "model_unavailable"


@dataclass
class ClassifierConfig:
    """What ``config.json`` holds: both architectures and the class lists of the heads."""

    concepts: list[str] = field(default_factory=list)  # concept head classes (captions)
    categories: list[str] = field(default_factory=list)  # category head classes
    concept_categories: list[str] = field(default_factory=list)  # category of each concept
    concept_channels: tuple[int, ...] = (32, 64, 128, 256)
    style_channels: tuple[int, ...] = (16, 32, 64, 128)  # strict style network
    # the public-styles network; None = not in this checkpoint (written before it existed)
    style_public_channels: tuple[int, ...] | None = None
    image_size: int = IMAGE_SIZE
    model_type: str = MODEL_TYPE
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.concept_channels = tuple(int(c) for c in self.concept_channels)
        self.style_channels = tuple(int(c) for c in self.style_channels)
        if self.style_public_channels is not None:
            self.style_public_channels = tuple(int(c) for c in self.style_public_channels)
        if len(self.concept_categories) != len(self.concepts):
            raise InvalidParameterError("concept_categories must list one category per concept")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["concept_channels"] = list(self.concept_channels)
        out["style_channels"] = list(self.style_channels)
        if self.style_public_channels is None:  # written as the older format was
            del out["style_public_channels"]
        else:
            out["style_public_channels"] = list(self.style_public_channels)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ClassifierConfig:
        if data.get("model_type") != MODEL_TYPE:
            raise ClassifierLoadError(f"not an evaluation-classifier config (model_type "
                                      f"{data.get('model_type')!r})")
        if data.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
            raise ClassifierLoadError(f"evaluation-classifier format {data['format_version']} "
                                      f"is newer than this dprdm understands ({FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------
# modules


class ConvNet(nn.Module):
    """(B, 3, 32, 32) in [-1, 1] -> pooled features (B, channels[-1]) -> one logit set per head.

    A stride-1 stem at ``channels[0]``, then per further stage a stride-2 and a stride-1 block,
    global average pooling; ``features`` is that pooled vector, each head is one linear layer.
    """

    def __init__(self, channels: tuple[int, ...], heads: dict[str, int],
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBlock(3, channels[0])]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [ConvBlock(c_in, c_out, 2), ConvBlock(c_out, c_out, 1)]
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(channels[-1], n) for name, n in heads.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.dropout(self.features(x))
        return {name: head(h) for name, head in self.heads.items()}


def build_networks(config: ClassifierConfig) -> tuple[ConvNet, ConvNet]:
    """(concept network with heads ``concept`` + ``category``, strict style network)."""
    concept = ConvNet(config.concept_channels,
                      {"concept": len(config.concepts), "category": len(config.categories)})
    style = ConvNet(config.style_channels, {"openmoji": 1})
    return concept, style


def build_style_public(config: ClassifierConfig) -> ConvNet | None:
    """The public-styles network (head ``openmoji``); None if the config has none."""
    if config.style_public_channels is None:
        return None
    return ConvNet(config.style_public_channels, {"openmoji": 1})


def to_input(images: np.ndarray, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, size, size) in [-1, 1]; other sizes are re-decoded.

    Resizing goes through :func:`dprdm.data.decode_image` (the path every dataset loader uses),
    so a 64 px image gives exactly the pixels ``load_folder(dir, 32)`` would have given.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise InvalidParameterError(
            f"images must be a uint8 numpy array, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InvalidParameterError(f"images must have shape (N, H, W, 3), got {images.shape}")
    if images.shape[1:3] != (size, size):
        from dprdm.data import decode_image

        images = np.stack([decode_image(image, size) for image in images]) if len(images) else (
            np.zeros((0, size, size, 3), np.uint8))
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# the instrument


class EvalClassifiers:
    """The concept/category network (PUBLIC data only) and the OpenMoji style networks.

    ``style_net`` is the strict one (against the public styles and their augmentations),
    ``style_public_net`` the one against the public styles only (None in checkpoints written
    before it existed; needs ``config.style_public_channels``).
    """

    def __init__(self, config: ClassifierConfig, concept_net: ConvNet | None = None,
                 style_net: ConvNet | None = None,
                 style_public_net: ConvNet | None = None) -> None:
        self.config = config
        built_concept, built_style = build_networks(config)
        self.concept_net = (concept_net or built_concept).eval()
        self.style_net = (style_net or built_style).eval()
        if style_public_net is not None and config.style_public_channels is None:
            raise InvalidParameterError("a style_public_net needs config.style_public_channels")
        self.style_public_net = style_public_net or build_style_public(config)
        if self.style_public_net is not None:
            self.style_public_net.eval()
        self.path: Path | None = None  # the directory it was loaded from, if any
        self._category_index = dict(zip(config.concepts, config.concept_categories))

    @property
    def concepts(self) -> list[str]:
        return list(self.config.concepts)

    @property
    def categories(self) -> list[str]:
        return list(self.config.categories)

    @property
    def feature_dim(self) -> int:
        return int(self.config.concept_channels[-1])

    def category_of(self, caption: str) -> str | None:
        """The emoji category of a public concept caption; None for a caption the head lacks."""
        return self._category_index.get(caption)

    # inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def _run(self, net: ConvNet, images: np.ndarray, what: str) -> np.ndarray:
        x = to_input(images, self.config.image_size)
        outputs = []
        for start in range(0, len(x), BATCH_SIZE):
            batch = x[start:start + BATCH_SIZE]
            out = net.features(batch) if what == "features" else net(batch)[what]
            outputs.append(out.float())
        if not outputs:
            width = (next(iter(net.heads.values())).in_features if what == "features"
                     else net.heads[what].out_features)
            return np.zeros((0, width), np.float32)
        return torch.cat(outputs).numpy().astype(np.float32)

    def describe(self) -> str:
        return "the demo's concept network (trained on PUBLIC emoji only)"

    def concept_logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, len(concepts))."""
        return self._run(self.concept_net, images, "concept")

    def category_logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, len(categories))."""
        return self._run(self.concept_net, images, "category")

    def features(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, F): the concept network's pooled (penultimate) features (FID/KID/PRDC)."""
        return self._run(self.concept_net, images, "features")

    @property
    def has_public_styles_net(self) -> bool:
        """Whether ``against="public-styles"`` is available (False for older checkpoints)."""
        return self.style_public_net is not None

    def openmoji_probability(self, images: np.ndarray,
                             against: str = AGAINST_PUBLIC_STYLES) -> np.ndarray:
        """float32 (N,): P(OpenMoji style) of a style network.

        ``against="public-styles"`` (default): OpenMoji vs Twemoji + Noto as they are -- "more
        like OpenMoji than like the public styles". ``against="public-and-augmentations"``: the
        strict network, which also calls the public styles' augmentations (outline,
        thick_stroke, ...) "not OpenMoji".
        """
        logits = self._run(self._style(against), images, "openmoji")[:, 0]
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)

    def style_features(self, images: np.ndarray,
                       against: str = AGAINST_PUBLIC_STYLES) -> np.ndarray:
        """float32 (N, F): a style network's pooled (penultimate) features.

        A feature space that SEES style, unlike the concept network's (trained to recognise a
        concept whatever its style): FID / KID in it read how far generations are from the
        held-out set's look. Demo-specific: the style networks know OpenMoji vs the public
        styles, nothing about another collection."""
        return self._run(self._style(against), images, "features")

    def _style(self, against: str) -> ConvNet:
        if against not in AGAINST:
            raise InvalidParameterError(f"against must be one of {AGAINST}, got {against!r}")
        if against == AGAINST_PUBLIC_AND_AUGMENTATIONS:
            return self.style_net
        if self.style_public_net is None:
            where = f" at {self.path}" if self.path is not None else ""
            raise ClassifierLoadError(
                f"the evaluation classifiers{where} have no public-styles network "
                f"(against={AGAINST_PUBLIC_STYLES!r}): they predate it. Add it with `python "
                f"-m dprdm.evaluation.train_classifiers --only style_public --out DIR`, or "
                f"use against={AGAINST_PUBLIC_AND_AUGMENTATIONS!r} (the strict network)")
        return self.style_public_net

    def feature_module(self) -> nn.Module:
        """The feature extractor as an ``nn.Module`` (what torchmetrics' ``feature=`` takes)."""
        return FeatureModule(self.concept_net)

    # save / load --------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, half: bool = True,
                        record: dict | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ ``training.json`` from `record`)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {}
        for prefix, net in self._named_nets():
            for key, value in net.state_dict().items():
                value = value.detach().cpu()
                if half and value.is_floating_point():
                    value = value.half()
                state[f"{prefix}.{key}"] = value.contiguous()
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=1) + "\n",
                                             encoding="utf-8")
        if record is not None:
            (directory / TRAINING_NAME).write_text(json.dumps(record, indent=2) + "\n",
                                                     encoding="utf-8")
        return directory

    def _named_nets(self) -> list[tuple[str, ConvNet]]:
        nets = [("concept", self.concept_net), ("style", self.style_net)]
        if self.style_public_net is not None:
            nets.append(("style_public", self.style_public_net))
        return nets

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike = DEFAULT_DIR) -> EvalClassifiers:
        """Load from a local directory (the shipped one by default); never touches the network."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(path)
        config_path, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights.is_file():
            raise ClassifierLoadError(
                f"no evaluation classifiers at {directory} (need {CONFIG_NAME} and "
                f"{WEIGHTS_NAME}; train them with `python -m dprdm.evaluation.train_classifiers`)")
        try:
            config = ClassifierConfig.from_dict(json.loads(config_path.read_text("utf-8")))
            state = load_file(str(weights))
        except (OSError, ValueError, TypeError, SafetensorError) as error:
            raise ClassifierLoadError(f"cannot read the classifiers at {directory}: {error}"
                                      ) from None
        model = cls(config)
        model.path = directory
        for prefix, net in model._named_nets():
            part = {k[len(prefix) + 1:]: v.float() if v.is_floating_point() else v
                    for k, v in state.items() if k.startswith(prefix + ".")}
            try:
                net.load_state_dict(part)
            except RuntimeError as error:
                raise ClassifierLoadError(f"{weights} does not match its {CONFIG_NAME} "
                                          f"({prefix}): {str(error).splitlines()[0]}") from None
            net.eval()
        return model


class StyleFeatures:
    """An extractor (``.features(images)``) for FID / KID in one style network's feature space."""

    def __init__(self, classifiers: EvalClassifiers, against: str) -> None:
        self.classifiers = classifiers
        self.against = against

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.classifiers.style_features(images, self.against)


class FeatureModule(nn.Module):
    """uint8 or float (N, 3, H, W) images -> (N, F) pooled concept-network features.

    The ``feature`` module torchmetrics' FID / KID call: they pass uint8 (N, 3, H, W) tensors
    (``normalize=False``), which this maps to the network's [-1, 1] 32 x 32 input. Frozen.
    """

    def __init__(self, net: ConvNet, size: int = IMAGE_SIZE) -> None:
        super().__init__()
        self.net = net.eval()
        self.size = size
        self.num_features = int(net.heads["concept"].in_features)
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureModule:  # stay in eval mode (BatchNorm)
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 127.5 - 1.0
        else:  # floats in [0, 1]
            x = x * 2.0 - 1.0
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.net.features(x)
