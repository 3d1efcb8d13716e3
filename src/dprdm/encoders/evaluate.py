"""Measuring an encoder on the emoji demo domains: content retrieval and style retention.

Owns the numbers docs/encoders.md reports (``dprdm encoders evaluate``). Evaluation only uses
concepts of the held-out OpenMoji set (``holdout/``), which the demo encoder never trains on in
any style, except where a realistic retrieval pool needs everything:

* ``retrieval/<split>`` -- caption -> image retrieval among the held-out concepts' images of one
  style: top-1 / top-10 concept accuracy (the right concept's image ranked first / in the top 10).
* ``probe_private`` -- a logistic-regression probe on image embeddings, OpenMoji (all of it:
  private + holdout) vs the public styles (held-out concepts), half of each for training:
  accuracy, recall (OpenMoji found) and specificity (public kept out).
* ``probe_public`` -- the same, twemoji vs google (held-out concepts).
* ``style_knn`` -- each holdout OpenMoji image's 10 nearest images in the pool twemoji + google +
  openmoji_private (all images): mean fraction that are OpenMoji, beside the chance level.
* ``dp_aggregate/sigma=S`` -- what survives DP noise (the reason a small ``dim`` matters: the
  noise norm grows like S * sqrt(dim)). Per holdout caption: the mean of its k=10 nearest
  OpenMoji images (private + holdout), plus N(0, S^2 I); then ``concept_top10`` (the caption's
  concept among the 10 holdout images nearest to the noisy aggregate) and ``openmoji_top10``
  (fraction of its 10 nearest images in the mixed pool of ``style_knn`` that are OpenMoji).
  No accounting here: S is a plain noise level, not a privacy claim.
* ``validation_style_knn`` (when ``data/emojione`` exists; issue 18's validation domain, a real
  public style no shipped network trains on) -- the same as ``style_knn`` with EmojiOne as the
  target: each held-out-concept EmojiOne image's 10 nearest in the pool twemoji + google +
  (fluent) + EmojiOne (other concepts); and ``probe_validation``, EmojiOne vs the other public
  styles (held-out concepts). ``validation_style_knn_fluent_hc`` / ``probe_validation_fluent_hc``:
  the same for Fluent High Contrast (when ``data/fluent_hc`` exists; the default validation
  domain from session 10).
* ``unseen_recipe_knn`` -- fine style: 40 procedural styles of :mod:`dprdm.data.style_family`
  drawn with a seed no training uses, each on 20 held-out-concept Twemoji images; for each
  image, the fraction of its 10 nearest (among the other 799) drawn in the SAME style. Chance
  19/799.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dprdm.data import load_folder
from dprdm.encoders.base import Encoder
from dprdm.errors import InvalidParameterError

SPLITS = {"twemoji": "data/twemoji", "google": "data/google",
          "openmoji_private": "data/openmoji_private", "holdout": "holdout"}
DATA_SIZE = 64
KNN = 10
NOISE_LEVELS = (0.0, 0.05, 0.1)


def retrieval_accuracy(text_emb: np.ndarray, image_emb: np.ndarray, text_concepts: list[str],
                       image_concepts: list[str], ks: tuple[int, ...] = (1, 10)
                       ) -> dict[str, float]:
    """Fraction of texts whose concept appears among the top-k images, for each k."""
    scores = text_emb @ image_emb.T
    order = np.argsort(-scores, axis=1, kind="stable")
    concepts = np.asarray(image_concepts)[order]
    hit = concepts == np.asarray(text_concepts)[:, None]
    return {f"top{k}": float(hit[:, :k].any(axis=1).mean()) for k in ks}


def linear_probe(positive: np.ndarray, negative: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Logistic regression, stratified 50/50 split, balanced class weights; test-set metrics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x = np.concatenate([positive, negative])
    y = np.concatenate([np.ones(len(positive), int), np.zeros(len(negative), int)])
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.5, stratify=y,
                                                        random_state=seed)
    probe = LogisticRegression(max_iter=5000, class_weight="balanced")
    predicted = probe.fit(x_train, y_train).predict(x_test)
    return {"accuracy": float((predicted == y_test).mean()),
            "recall": float(predicted[y_test == 1].mean()),
            "specificity": float(1.0 - predicted[y_test == 0].mean()),
            "n_test": int(len(y_test))}


def style_knn(queries: np.ndarray, pool: np.ndarray, pool_is_target: np.ndarray,
              k: int = KNN) -> float:
    """Mean fraction of each query's k nearest pool items that are targets."""
    nearest = np.argsort(-(queries @ pool.T), axis=1, kind="stable")[:, :k]
    return float(pool_is_target[nearest].mean())


def noisy_aggregates(queries: np.ndarray, private: np.ndarray, sigma: float, k: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Mean of each query's k nearest private rows, plus N(0, sigma^2 I) (no privacy claim)."""
    nearest = np.argsort(-(queries @ private.T), axis=1, kind="stable")[:, :k]
    aggregate = private[nearest].mean(axis=1)
    return aggregate + rng.normal(0.0, sigma, size=aggregate.shape).astype(np.float32)


def evaluate_encoder(encoder: Encoder, data_root: str | Path, *, seed: int = 0,
                     progress: bool = False) -> dict:
    """All the measurements above for `encoder` on the demo data under `data_root`."""
    root = Path(data_root)
    data = {}
    for name, folder in SPLITS.items():
        if not (root / folder).is_dir():
            raise InvalidParameterError(f"{root / folder} is missing; prepare the demo data first")
        data[name] = load_folder(root / folder, DATA_SIZE, show_progress=progress)
    concepts = {name: [row["concept"] for row in d.extra] for name, d in data.items()}
    image_emb = {name: encoder.encode_images(d.images, progress=progress)
                 for name, d in data.items()}
    held_out = set(concepts["holdout"])
    unseen = {name: np.array([c in held_out for c in concepts[name]]) for name in data}

    result: dict = {"encoder": encoder.describe(), "held_out_concepts": len(held_out)}
    for name in ("holdout", "twemoji", "google"):
        mask = unseen[name]
        captions = [c for c, m in zip(data[name].captions, mask) if m]
        kept = [c for c, m in zip(concepts[name], mask) if m]
        text_emb = encoder.encode_text(captions)
        result[f"retrieval/{name}"] = {**retrieval_accuracy(text_emb, image_emb[name][mask],
                                                            kept, kept),
                                       "n": int(mask.sum())}
    openmoji = np.concatenate([image_emb["openmoji_private"], image_emb["holdout"]])
    public = np.concatenate([image_emb["twemoji"][unseen["twemoji"]],
                             image_emb["google"][unseen["google"]]])
    result["probe_private"] = linear_probe(openmoji, public, seed)
    result["probe_public"] = linear_probe(image_emb["twemoji"][unseen["twemoji"]],
                                          image_emb["google"][unseen["google"]], seed)
    pool = np.concatenate([image_emb["twemoji"], image_emb["google"],
                           image_emb["openmoji_private"]])
    n_public = len(image_emb["twemoji"]) + len(image_emb["google"])
    is_openmoji = np.arange(len(pool)) >= n_public
    result["style_knn"] = {"openmoji_fraction_top10": style_knn(image_emb["holdout"], pool,
                                                                is_openmoji),
                           "chance": float(is_openmoji.mean())}
    holdout_text = encoder.encode_text(data["holdout"].captions)
    rng = np.random.default_rng(seed)
    for sigma in NOISE_LEVELS:
        released = noisy_aggregates(holdout_text, openmoji, sigma, KNN, rng)
        concept = retrieval_accuracy(released, image_emb["holdout"], concepts["holdout"],
                                     concepts["holdout"], ks=(10,))["top10"]
        result[f"dp_aggregate/sigma={sigma:g}"] = {
            "concept_top10": concept,
            "openmoji_top10": style_knn(released, pool, is_openmoji),
            "noise_norm": float(sigma * np.sqrt(encoder.dim))}
    result.update(validation_measures(encoder, root, data, concepts, held_out, seed, progress))
    return result


UNSEEN_RECIPE_SEED = 987654  # no training run uses it (training families: seed 12345)


def validation_measures(encoder: Encoder, root: Path, data: dict, concepts: dict,
                        held_out: set[str], seed: int, progress: bool) -> dict:
    """``validation_style_knn``, ``probe_validation`` and ``unseen_recipe_knn`` (docstring)."""
    from dprdm.data.style_family import apply_recipe, style_family

    out: dict = {}
    twemoji = data["twemoji"].images[[c in held_out for c in concepts["twemoji"]]]
    rng = np.random.default_rng(seed)
    styled, labels = [], []
    for j, recipe in enumerate(style_family(40, UNSEEN_RECIPE_SEED)):
        rows = rng.choice(len(twemoji), size=min(20, len(twemoji)), replace=False)
        styled.append(apply_recipe(twemoji[rows], recipe))
        labels += [j] * len(rows)
    emb = encoder.encode_images(np.concatenate(styled), progress=progress)
    labels_array = np.array(labels)
    scores = emb @ emb.T
    np.fill_diagonal(scores, -np.inf)
    nearest = np.argsort(-scores, axis=1, kind="stable")[:, :KNN]
    out["unseen_recipe_knn"] = {
        "same_style_fraction_top10": float((labels_array[nearest] == labels_array[:, None]).mean()),
        "chance": float((len(rows) - 1) / (len(labels) - 1))}

    targets = [(t, suffix) for t, suffix in (("emojione", ""), ("fluent_hc", "_fluent_hc"))
               if (root / "data" / t).is_dir()]
    if not targets:
        return out
    pool_names = [n for n in ("twemoji", "google", "fluent") if (root / "data" / n).is_dir()]
    pool = embedded(encoder, root, data, pool_names, held_out, progress)  # once for every style
    for target, suffix in targets:
        knn, probe = held_out_style(pool, embedded(encoder, root, data, [target], held_out,
                                                   progress)[target], target, seed)
        out[f"validation_style_knn{suffix}"], out[f"probe_validation{suffix}"] = knn, probe
    return out


def embedded(encoder: Encoder, root: Path, data: dict, names: list[str], held_out: set[str],
             progress: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (image embeddings of split `name`, mask of its held-out-concept rows)."""
    out = {}
    for name in names:
        folder = data[name] if name in data else load_folder(root / "data" / name, DATA_SIZE,
                                                             show_progress=progress)
        out[name] = (encoder.encode_images(folder.images, progress=progress),
                     np.isin([row["concept"] for row in folder.extra], list(held_out)))
    return out


def held_out_style(pool_of: dict[str, tuple[np.ndarray, np.ndarray]],
                   target_of: tuple[np.ndarray, np.ndarray], target: str,
                   seed: int) -> tuple[dict, dict]:
    """A validation style's held-out-concept images: the fraction of their 10 nearest in the
    pool (the `pool_of` splits + the style's other concepts) that are the style, and a linear
    probe of the style against the pool's held-out-concept images."""
    target_emb, unseen_target = target_of
    others = [emb for emb, _ in pool_of.values()]
    pool = np.concatenate(others + [target_emb[~unseen_target]])
    is_target = np.arange(len(pool)) >= sum(len(o) for o in others)
    knn = {f"{target}_fraction_top10": style_knn(target_emb[unseen_target], pool, is_target),
           "chance": float(is_target.mean()), "pool": [*pool_of, target]}
    public_unseen = np.concatenate([emb[unseen] for emb, unseen in pool_of.values()])
    return knn, linear_probe(target_emb[unseen_target], public_unseen, seed)


def flatten(result: dict) -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` for one-table display."""
    out: dict[str, object] = {}
    for key, value in result.items():
        if isinstance(value, dict) and key != "encoder":
            for sub, inner in value.items():
                out[f"{key}.{sub}"] = inner
        elif isinstance(value, dict):
            out.update({f"encoder.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def write_report(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
