"""Evaluation metrics: distribution distances, concept / style scores, text-image alignment.

Owns the numbers ``dprdm eval`` reports. Every function takes ``uint8 (N, H, W, 3)`` images.

* :func:`distribution_metrics` -- FID and KID (torchmetrics' own ``FrechetInceptionDistance`` and
  ``KernelInceptionDistance``) and precision / recall / density / coverage (:func:`prdc`,
  Naeem et al. 2020), all in the feature space of one extractor: by default the PUBLIC concept
  network of :class:`~dprdm.evaluation.classifiers.EvalClassifiers`, or InceptionV3 from a
  local weights file (:func:`inception_extractor`).
* :func:`concept_scores` / :func:`style_scores` -- what the evaluation classifiers recognise.
* :func:`alignment_score` -- cosine between image and caption embeddings of an encoder.

Nothing here downloads anything.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from dprdm.errors import DprdmError, InvalidParameterError

PRDC_K = 5
KID_MAX_SUBSET = 1000
FID_BOOTSTRAPS = 20
INCEPTION_WEIGHTS_HINT = (
    "the FID InceptionV3 weights of torch-fidelity, weights-inception-2015-12-05-6726825d.pth "
    "(https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth), downloaded on a machine with network access "
    "and copied here")


class FeatureExtractor(Protocol):
    def features(self, images: np.ndarray) -> np.ndarray: ...


class InceptionUnavailableError(DprdmError):
    """The InceptionV3 extractor cannot be built (no local weights file, or no torch-fidelity)."""

    code = "model_unavailable"


def _check_images(images: object, what: str) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or (
            images.shape[-1] != 3):
        raise InvalidParameterError(
            f"{what} must be a uint8 (N, H, W, 3) array, got "
            f"{getattr(images, 'dtype', type(images))} {getattr(images, 'shape', '')}")
    return images


def _check_captions(captions: object, n: int) -> list[str]:
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise InvalidParameterError("captions must be a list of strings")
    captions = list(captions)
    if len(captions) != n:
        raise InvalidParameterError(f"{n} images but {len(captions)} captions")
    return captions


# ---------------------------------------------------------------------------------------------
# distribution metrics


class PrecomputedFeatures(nn.Module):
    """The identity, as the ``feature`` module of torchmetrics' FID / KID.

    :func:`distribution_metrics` extracts every image's features once (they serve FID, KID and
    PRDC) and hands them to torchmetrics through this module, so the FID / KID arithmetic is
    torchmetrics' own. To run torchmetrics on images directly, pass
    ``EvalClassifiers.feature_module()`` as ``feature=`` instead: the numbers are the same.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def prdc(real: np.ndarray, fake: np.ndarray, k: int = PRDC_K) -> dict[str, float]:
    """Precision, recall, density and coverage of `fake` against `real` feature sets.

    Naeem, Oh, Uh, Choi, Yoo: *Reliable Fidelity and Diversity Metrics for Generative Models*,
    ICML 2020 (https://arxiv.org/abs/2002.09797), same definitions as their reference code
    (``clovaai/generative-evaluation-prdc``). Each sample's ball has the radius of its k-th
    nearest neighbour within its own set (itself excluded). Precision: share of fake samples
    inside some real ball; recall: share of real samples inside some fake ball; density: mean
    number of real balls a fake sample falls in, divided by k (can exceed 1); coverage: share of
    real balls that contain at least one fake sample.
    """
    real_t = torch.as_tensor(np.asarray(real, np.float64))
    fake_t = torch.as_tensor(np.asarray(fake, np.float64))
    if len(real_t) <= k or len(fake_t) <= k:
        raise InvalidParameterError(f"PRDC with k={k} needs more than {k} real and fake samples "
                                    f"(got {len(real_t)} real, {len(fake_t)} fake)")
    # k-th neighbour within the set: index k of the sorted row, index 0 being the point itself
    real_radii = torch.cdist(real_t, real_t).kthvalue(k + 1, dim=1).values
    fake_radii = torch.cdist(fake_t, fake_t).kthvalue(k + 1, dim=1).values
    cross = torch.cdist(real_t, fake_t)  # (n_real, n_fake)
    inside_real = cross < real_radii[:, None]  # fake j inside real i's ball
    return {
        "precision": float(inside_real.any(dim=0).double().mean()),
        "recall": float((cross < fake_radii[None, :]).any(dim=1).double().mean()),
        "density": float(inside_real.double().sum(dim=0).mean() / k),
        "coverage": float((cross.min(dim=1).values < real_radii).double().mean()),
    }


def extract_features(extractor: Any, images: np.ndarray) -> np.ndarray:
    """float64 (N, F) features of `images` from anything with ``.features(images)``."""
    if not hasattr(extractor, "features"):
        raise InvalidParameterError("extractor must have a .features(images) method "
                                    "(EvalClassifiers, or inception_extractor(path))")
    features = np.asarray(extractor.features(images), dtype=np.float64)
    if features.ndim != 2 or len(features) != len(images):
        raise InvalidParameterError(f"extractor returned features of shape {features.shape} "
                                    f"for {len(images)} images")
    return features


def distribution_metrics(real: np.ndarray, fake: np.ndarray, extractor: Any, *,
                         kid_subsets: int = 100, kid_subset_size: int | None = None,
                         seed: int = 0, fid_bootstraps: int = FID_BOOTSTRAPS
                         ) -> dict[str, float | int]:
    """FID, KID (mean and std over subsets) and PRDC (k=5) of `fake` against `real` images.

    `extractor` has ``.features(images) -> (N, F)``: :class:`EvalClassifiers` (the default
    feature space of ``dprdm eval``) or :func:`inception_extractor`. FID and KID are computed by
    torchmetrics (KID: polynomial kernel of degree 3, ``kid_subsets`` random subsets of
    ``kid_subset_size`` samples per side; by default ``min(1000, n_real // 2, n_fake // 2)`` --
    half of the smaller set, so that subsets differ and ``kid_std`` measures their spread; at
    ``min(n_real, n_fake)`` every subset of the smaller side would be the same set). `seed` fixes
    the KID subsets, so one input gives one answer. FID is biased upwards at a few hundred
    samples; KID is unbiased, which is why it is the one to compare across sample sizes.
    ``fid_std`` is the spread of FID over `fid_bootstraps` bootstrap resamples (real and fake
    drawn with replacement, seeded): a standard error for comparing settings on the same sets
    (the bootstrap mean itself is biased upwards by the duplicates, so only its spread is used).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real = _check_images(real, "real")
    fake = _check_images(fake, "fake")
    if len(real) < 2 or len(fake) < 2:
        raise InvalidParameterError("distribution metrics need at least 2 real and 2 fake images")
    if kid_subset_size is None:
        kid_subset_size = max(2, min(KID_MAX_SUBSET, len(real) // 2, len(fake) // 2))
    if not 2 <= kid_subset_size <= min(len(real), len(fake)):
        raise InvalidParameterError(f"kid_subset_size must be in [2, {min(len(real), len(fake))}]"
                                    f", got {kid_subset_size}")
    if kid_subsets < 1:
        raise InvalidParameterError(f"kid_subsets must be >= 1, got {kid_subsets}")
    real_features = torch.from_numpy(extract_features(extractor, real))
    fake_features = torch.from_numpy(extract_features(extractor, fake))
    identity = PrecomputedFeatures(real_features.shape[1])

    fid = FrechetInceptionDistance(feature=identity, reset_real_features=True)
    fid.update(real_features, real=True)
    fid.update(fake_features, real=False)
    with warnings.catch_warnings():  # "KID keeps every feature in memory": that is the point
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=identity, subsets=kid_subsets,
                                      subset_size=kid_subset_size)
    kid.update(real_features, real=True)
    kid.update(fake_features, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    out: dict[str, float | int] = {
        "fid": float(fid.compute()),
        "fid_std": _bootstrap_fid_std(real_features, fake_features, identity, fid_bootstraps,
                                      seed),
        "kid": float(kid_mean), "kid_std": float(kid_std),
        "kid_subset_size": int(kid_subset_size), "kid_subsets": int(kid_subsets)}
    out.update(prdc(real_features.numpy(), fake_features.numpy(), PRDC_K))
    out.update({"n_real": len(real), "n_fake": len(fake),
                "feature_dim": int(real_features.shape[1])})
    return out


def _kid_full(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased MMD^2 with KID's kernel (x.y / d + 1)^3 on all the features at once (no subsets)."""
    dim = real.shape[1]
    k_rr = (real @ real.T / dim + 1.0) ** 3
    k_ff = (fake @ fake.T / dim + 1.0) ** 3
    k_rf = (real @ fake.T / dim + 1.0) ** 3
    m, n = len(real), len(fake)
    return float((k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
                 + (k_ff.sum() - np.trace(k_ff)) / (n * (n - 1)) - 2.0 * k_rf.mean())


def paired_kid_difference(real: np.ndarray, fake_a: np.ndarray, fake_b: np.ndarray,
                          extractor: Any, resamples: int = 200, seed: int = 0) -> dict:
    """KID(fake_a) - KID(fake_b) against the same `real` images, with a paired bootstrap.

    Row i of `real`, `fake_a` and `fake_b` belong together (a held-out image and the two settings'
    generations for its prompt, as ``dprdm eval`` writes them to images.npz), so each resample
    draws the same rows for all three: the std is that of the DIFFERENCE, which the two settings'
    own KID stds overstate. Full-set KID (no subsets). Returns the difference, its bootstrap std
    and the share of resamples in which `fake_a` is closer to `real` (x1, not x1e3).

    `fake_a` and `fake_b` may hold R generations per prompt: R x n rows, repeat-major (row
    ``j * n + i`` belongs to prompt i), e.g. the images of R ``dprdm eval`` runs with different
    ``--seed`` concatenated. A resample then draws all R generations of each prompt it draws, so
    the diffusion seeds' share of the spread is averaged down while the held-out set's is kept."""
    real = _check_images(real, "real")
    fake_a, fake_b = _check_images(fake_a, "fake_a"), _check_images(fake_b, "fake_b")
    n = len(real)
    if n < 4 or len(fake_a) != len(fake_b) or len(fake_a) % n or not len(fake_a):
        raise InvalidParameterError("paired_kid_difference needs >= 4 real images and the same "
                                    "number of fake_a and fake_b images, R per real one (R x n "
                                    "rows, row j * n + i belonging to real row i)")
    if resamples < 2:
        raise InvalidParameterError(f"resamples must be >= 2, got {resamples}")
    r, a, b = (extract_features(extractor, x) for x in (real, fake_a, fake_b))
    repeat_offsets = n * np.arange(len(fake_a) // n)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        rows = rng.integers(0, n, n)
        fake_rows = (repeat_offsets[:, None] + rows[None, :]).ravel()
        diffs.append(_kid_full(r[rows], a[fake_rows]) - _kid_full(r[rows], b[fake_rows]))
    diffs_array = np.asarray(diffs)
    return {"difference": _kid_full(r, a) - _kid_full(r, b), "std": float(diffs_array.std()),
            "share_a_better": float(np.mean(diffs_array < 0)), "resamples": resamples}


def _bootstrap_fid_std(real: torch.Tensor, fake: torch.Tensor, identity: nn.Module,
                       resamples: int, seed: int) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    if resamples < 2:
        raise InvalidParameterError(f"fid_bootstraps must be >= 2, got {resamples}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        fid = FrechetInceptionDistance(feature=identity, reset_real_features=True)
        fid.update(real[rng.integers(0, len(real), len(real))], real=True)
        fid.update(fake[rng.integers(0, len(fake), len(fake))], real=False)
        values.append(float(fid.compute()))
    return float(np.std(values, ddof=1))


# ---------------------------------------------------------------------------------------------
# classifier scores


def concept_scores(images: np.ndarray, captions: list[str], classifiers: Any) -> dict:
    """Top-1 / top-10 concept accuracy and category accuracy of the prompted captions.

    Images whose caption the concept head does not know are counted (``n_unknown``) and left
    out of every accuracy; ``n`` is the number scored. Chance is 1/len(concepts) (top-1),
    10/len(concepts) (top-10) and about 1/len(categories) for the category.
    """
    images = _check_images(images, "images")
    captions = _check_captions(captions, len(images))
    index = {c: i for i, c in enumerate(classifiers.concepts)}
    category_index = {c: i for i, c in enumerate(classifiers.categories)}
    known = np.array([c in index for c in captions], dtype=bool)
    n = int(known.sum())
    out: dict[str, float | int | None] = {"n": n, "n_unknown": int(len(captions) - n),
                                          "n_concepts": len(index)}
    if n == 0:
        return out | {"concept_top1": None, "concept_top10": None, "category_acc": None}
    chosen = images[known]
    targets = np.array([index[c] for c, k in zip(captions, known) if k])
    logits = classifiers.concept_logits(chosen)
    target_logit = logits[np.arange(n), targets]
    rank = (logits > target_logit[:, None]).sum(axis=1)  # 0 = predicted first
    cat_targets = np.array([category_index[classifiers.category_of(c)]
                            for c, k in zip(captions, known) if k])
    category = classifiers.category_logits(chosen).argmax(axis=1)
    return out | {"concept_top1": float(np.mean(rank < 1)),
                  "concept_top10": float(np.mean(rank < 10)),
                  "category_acc": float(np.mean(category == cat_targets))}


STYLE_NETWORKS = (("", "public-styles"), ("_strict", "public-and-augmentations"))


def style_scores(images: np.ndarray, classifiers: Any, threshold: float = 0.5) -> dict:
    """Share of images each style network calls OpenMoji (P >= threshold), and the mean P.

    ``openmoji_like`` / ``openmoji_probability_mean``: the public-styles network (OpenMoji vs
    Twemoji + Noto as they are: "more like OpenMoji than like the public styles").
    ``openmoji_like_strict`` / ``openmoji_probability_mean_strict``: the strict network, which
    also counts the public styles' augmentations (outline, thick_stroke, ...) as "not OpenMoji".
    """
    images = _check_images(images, "images")
    if not 0.0 < threshold < 1.0:
        raise InvalidParameterError(f"threshold must be in (0, 1), got {threshold}")
    out: dict[str, Any] = {"n": len(images)}
    # a validation judge (dprdm.evaluation.judge) has the strict network only
    for suffix, against in getattr(classifiers, "style_networks", STYLE_NETWORKS):
        p = np.asarray(classifiers.openmoji_probability(images, against=against),
                       dtype=np.float64)
        empty = len(p) == 0
        out[f"openmoji_like{suffix}"] = None if empty else float(np.mean(p >= threshold))
        out[f"openmoji_probability_mean{suffix}"] = None if empty else float(p.mean())
    if len(images):
        out["threshold"] = threshold
    return out


def alignment_score(images: np.ndarray, captions: list[str], encoder: Any) -> dict:
    """Mean (and std) cosine between each image's and its caption's embedding in `encoder`.

    `encoder` is a :class:`dprdm.encoders.Encoder` (unit-norm rows). ``alignment_mismatched``
    is the same mean with the captions shifted by one position among the distinct captions (each
    image against another prompt's caption): the level that carries no information about
    the prompt, to read ``alignment`` against.
    """
    images = _check_images(images, "images")
    captions = _check_captions(captions, len(images))
    if not captions:
        raise InvalidParameterError("alignment needs at least one image")
    image_emb = np.asarray(encoder.encode_images(images), dtype=np.float64)
    unique = sorted(set(captions))
    text_of = dict(zip(unique, np.asarray(encoder.encode_text(unique), dtype=np.float64)))
    text_emb = np.stack([text_of[c] for c in captions])
    cosine = np.sum(image_emb * text_emb, axis=1)
    out = {"alignment": float(cosine.mean()), "alignment_std": float(cosine.std()),
           "n": len(captions), "alignment_mismatched": None}
    if len(unique) > 1:
        other = {c: unique[(i + 1) % len(unique)] for i, c in enumerate(unique)}
        mismatched = np.stack([text_of[other[c]] for c in captions])
        out["alignment_mismatched"] = float(np.sum(image_emb * mismatched, axis=1).mean())
    return out


class EncoderImageFeatures:
    """The generator's own image tower as a feature space: ``.features(images)`` are the encoder's
    unit-norm image embeddings, so FID/KID/PRDC read as distances in CLIP space ("FD_CLIP").

    The generic feature space of ``dprdm eval`` on data other than the emoji demo, where the demo
    classifiers mean nothing; it needs no file beyond the encoder itself."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder

    def describe(self) -> str:
        name = getattr(self.encoder, "name", type(self.encoder).__name__)
        return f"the encoder's image tower ({name}, {self.encoder.dim}-d): FD in CLIP space"

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.encoder.encode_images(images), dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# InceptionV3 from a local file


@contextmanager
def _no_downloads():
    """Make torch's URL loaders fail loudly while the extractor is built."""
    import torch.hub

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise InceptionUnavailableError("refusing to download weights: dprdm never downloads; "
                                        "pass a local weights file")

    patched = [(torch.hub, "load_state_dict_from_url"), (torch.hub, "download_url_to_file")]
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

        patched.append((tf_inception, "load_state_dict_from_url"))
    except ImportError:
        pass
    saved = [(module, name, getattr(module, name)) for module, name in patched
             if hasattr(module, name)]
    for module, name, _ in saved:
        setattr(module, name, refuse)
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


class InceptionExtractor:
    """torch-fidelity's FID InceptionV3 (2048-d pool features) via torchmetrics, local weights.

    ``features(images)`` takes uint8 (N, H, W, 3) of any size (resized to 299 inside, as FID
    does). ``module`` is the torchmetrics ``NoTrainInceptionV3`` itself.
    """

    def __init__(self, module: nn.Module, batch_size: int = 64) -> None:
        self.module = module.eval()
        self.batch_size = batch_size
        self.num_features = 2048

    def describe(self) -> str:
        return "InceptionV3 (FID's 2048-d pool features, from a local weights file)"

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        images = _check_images(images, "images")
        out = [self.module(torch.from_numpy(np.ascontiguousarray(
            images[i:i + self.batch_size])).permute(0, 3, 1, 2)).float()
            for i in range(0, len(images), self.batch_size)]
        if not out:
            return np.zeros((0, self.num_features), np.float32)
        return torch.cat(out).reshape(len(images), -1).numpy().astype(np.float32)


def inception_extractor(weights_path: str | os.PathLike) -> InceptionExtractor:
    """The FID InceptionV3 with weights read from `weights_path`; never downloads.

    Needs torch-fidelity (``pip install torch-fidelity``; it brings torchvision) and
    :data:`INCEPTION_WEIGHTS_HINT`'s file. Raises :class:`InceptionUnavailableError` with what is
    missing.
    """
    if weights_path is None or str(weights_path) == "":
        raise InceptionUnavailableError(f"no Inception weights path given; need "
                                        f"{INCEPTION_WEIGHTS_HINT}")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise InceptionUnavailableError(f"Inception weights not found at {path}; need "
                                        f"{INCEPTION_WEIGHTS_HINT}")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError as error:  # pragma: no cover - torchmetrics is a dependency
        raise InceptionUnavailableError(f"torchmetrics is not importable: {error}") from None
    if not _TORCH_FIDELITY_AVAILABLE:
        raise InceptionUnavailableError(
            "the Inception extractor needs torch-fidelity (`pip install torch-fidelity`, which "
            "also installs torchvision); the default extractor, EvalClassifiers, needs neither")
    with _no_downloads():
        try:
            module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                        feature_extractor_weights_path=str(path))
        except InceptionUnavailableError:
            raise
        except Exception as error:  # noqa: BLE001 - a bad file surfaces as many error types
            raise InceptionUnavailableError(
                f"cannot load Inception weights from {path}: {error}") from None
    return InceptionExtractor(module)
