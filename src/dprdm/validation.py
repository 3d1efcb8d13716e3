"""The validation domain: EmojiOne held out of training and treated as "private" while iterating.

Recipes (generator, encoder, augmentations, guidance, lam) are chosen on a domain that is not
the demo's private OpenMoji: EmojiOne 2 (``emojione``), a real public style that no shipped
network (demo encoder, generator, the fine-tunes made from them) has been trained on. Noto
cannot serve: every shipped network starts from weights trained on it. Owns building, under
``.dprdm-demo/validation/`` (:mod:`dprdm.demo_layout`):

* ``private/`` -- a private index + ledger of the EmojiOne images whose concept is NOT one of
  the OpenMoji held-out concepts, embedded with the image tower that ``dprdm eval`` uses, the
  mechanism pinned as the demo's own private index pins it (:mod:`dprdm.demo`);
* ``holdout/`` -- the EmojiOne images OF the OpenMoji held-out concepts + ``captions.jsonl``
  (the prompts and the reference set), laid out like ``.dprdm-demo/holdout``. EmojiOne 2 stops
  at Unicode 9, so only the held-out concepts it draws are there (163 of the 243);
* ``public/``  -- the public index of the validation domain: Twemoji + Noto + Fluent (the
  public collections a generator may train on while EmojiOne is held out), no ledger.

Both indexes record the image tower they were embedded with (``conditioning_space.json``); when
the tower changes (a retrained demo encoder) they are deleted and rebuilt, and this says so: a
rebuilt private index is a new data set with a new ledger. ``dprdm eval --demo --validation``
calls :func:`prepare_validation` (builds only what is missing or stale) and scores with the
validation judge (:mod:`dprdm.evaluation.judge`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dprdm import demo_layout
from dprdm.data.emoji import SPLITS
from dprdm.errors import DprdmError, InvalidParameterError

VALIDATION_SPLIT = "emojione"  # EmojiOne 2: seen by no shipped network
VALIDATION_PUBLIC_SPLITS = ("twemoji", "google", "fluent")
VALIDATION_STYLE = SPLITS[VALIDATION_SPLIT][1].title  # for reports: "EmojiOne"
VALIDATION_PUBLIC_STYLES = " + ".join(SPLITS[s][1].title for s in VALIDATION_PUBLIC_SPLITS)
CAPTIONS = "captions.jsonl"
IMAGE_SIZE = 64  # the size the demo embeds its indexes at

Say = Callable[[str], None]


def openmoji_holdout_concepts(root: Path) -> set[str]:
    """The concepts of the demo's OpenMoji held-out set (its ``holdout/captions.jsonl``)."""
    path = root / "holdout" / CAPTIONS
    if not path.is_file():
        raise DprdmError(f"{path} does not exist: prepare the demo data first")
    return {json.loads(line)["concept"] for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()}


def _rows(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / CAPTIONS).read_text(encoding="utf-8"
                                                                         ).splitlines()
            if line.strip()]


def holdout_rows(root: Path) -> list[dict[str, Any]]:
    """The EmojiOne captions rows of the OpenMoji held-out concepts, in EmojiOne's order."""
    concepts = openmoji_holdout_concepts(root)
    return [row for row in _rows(root / "data" / VALIDATION_SPLIT) if row["concept"] in concepts]


def write_holdout(root: Path, out: Path) -> int:
    """Copy the held-out EmojiOne images and their captions rows into `out` (all or nothing)."""
    rows = holdout_rows(root)
    if not rows:
        raise DprdmError(f"no {VALIDATION_STYLE} image of an OpenMoji held-out concept: is the "
                         "demo data whole?")
    source = root / "data" / VALIDATION_SPLIT
    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for row in rows:
        shutil.copyfile(source / row["file"], staging / row["file"])
    (staging / CAPTIONS).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n"
                                            for row in rows), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return len(rows)


def _holdout_complete(root: Path, out: Path) -> bool:
    if not (out / CAPTIONS).is_file():
        return False
    expected = holdout_rows(root)
    return (_rows(out) == expected
            and all((out / row["file"]).is_file() for row in expected))


def _load(folders: Sequence[Path], keep: Callable[[dict[str, Any]], bool] | None = None):
    """Images (at IMAGE_SIZE), ids and metadata of the rows of `folders` that `keep` accepts."""
    from dprdm.data import load_folder

    images, ids, metadata = [], [], []
    for folder in folders:
        dataset = load_folder(folder, IMAGE_SIZE, show_progress=False)
        chosen = [i for i, extra in enumerate(dataset.extra) if keep is None or keep(extra)]
        images.append(dataset.images[chosen])
        ids += [f"{folder.name}/{dataset.ids[i]}" for i in chosen]
        metadata += [dict(dataset.extra[i], caption=dataset.captions[i]) for i in chosen]
    return np.concatenate(images), ids, metadata


def _stale(index_dir: Path, space, what: str, styles: Sequence[str], say: Say) -> bool:
    """True (after deleting it) when the index at `index_dir` is missing, broken, embedded with
    another image tower than `space` or holds other styles than `styles` (an index built when
    another style was the validation domain); False when it can be reused."""
    from dprdm.generation.backends.base import ConditioningSpace
    from dprdm.privacy import open_private_index
    from dprdm.privacy.binding import binding_of
    from dprdm.retrieval import EmbeddingIndex

    if not index_dir.exists():
        return True
    reason = None
    try:
        held = {m.get("style") for m in EmbeddingIndex.open(index_dir).metadata or []}
        recorded = ConditioningSpace.load(index_dir)
        if held != set(styles):
            reason = (f"it holds the styles {', '.join(sorted(map(str, held))) or 'none'}, not "
                      f"{', '.join(sorted(styles))}")
        elif recorded is None or recorded.fingerprint != space.fingerprint:
            reason = (f"it was embedded with another image tower "
                      f"({recorded.family if recorded else 'unrecorded'}, fingerprint "
                      f"{recorded.fingerprint[:12] if recorded else '-'}) than the one "
                      f"evaluated now ({space.family}, fingerprint {space.fingerprint[:12]})")
        elif what == "private" and binding_of(index_dir) is not None:
            open_private_index(index_dir, read_only=True)
        elif what == "private":
            reason = "it has no ledger"
    except DprdmError as error:
        reason = str(error)
    if reason is None:
        return False
    extra = (" (a new data set with a new ledger: the old ledger goes with it)"
             if what == "private" else "")
    say(f"validation {what} index {index_dir}: {reason}; deleting it and building a new one"
        f"{extra}")
    shutil.rmtree(index_dir)
    return True


def _build(index_dir: Path, backend, folders: Sequence[Path],
           keep: Callable[[dict[str, Any]], bool] | None, what: str, say: Say) -> None:
    from dprdm.retrieval import build_index

    images, ids, metadata = _load(folders, keep)
    embeddings = backend.embed_images(images)
    space = json.dumps(backend.space.to_dict(), indent=1) + "\n"
    index = build_index(embeddings, index_dir, ids=ids, metadata=metadata,
                        extra_files={"conditioning_space.json": space.encode()})
    say(f"validation {what} index: built {index_dir} ({index.n} records, d={index.dim})")


def prepare_validation(backend, root: Path | None = None,
                       say: Say = print) -> dict[str, Any]:
    """Build what is missing or stale of the validation domain under ``root/validation``.

    `backend` is the generator backend ``dprdm eval`` uses (its image tower embeds the images;
    its space's fingerprint is recorded). Prepares the demo data splits it needs first (npm,
    only when they are missing). Returns the three directories and their sizes.
    """
    from dprdm.data.emoji import prepare_demo_data
    from dprdm.demo import DEMO_K, DEMO_LAM, DEMO_Q, DEMO_QUERIES, DELTA, EPSILON
    from dprdm.privacy import MechanismParams, accounting, init_budget
    from dprdm.retrieval import EmbeddingIndex

    root = Path(root) if root is not None else demo_layout.demo_root()
    prepare_demo_data(root, splits=(VALIDATION_SPLIT, "openmoji_private", "holdout",
                                    *VALIDATION_PUBLIC_SPLITS), show_progress=False)
    holdout_dir = demo_layout.validation_holdout_dir(root)
    private_dir = demo_layout.validation_private_index_dir(root)
    public_dir = demo_layout.validation_public_index_dir(root)
    holdout_dir.parent.mkdir(parents=True, exist_ok=True)
    if not _holdout_complete(root, holdout_dir):
        count = write_holdout(root, holdout_dir)
        say(f"validation held-out set: wrote {holdout_dir} ({count} {VALIDATION_STYLE} images)")
    held = openmoji_holdout_concepts(root)
    data = root / "data"

    if _stale(private_dir, backend.space, "private", (VALIDATION_SPLIT,), say):
        _build(private_dir, backend, [data / VALIDATION_SPLIT],
               lambda extra: extra.get("concept") not in held, "private", say)
        sigma = accounting.calibrate_sigma(EPSILON, DEMO_Q, DEMO_K, DEMO_QUERIES, DELTA)
        init_budget(private_dir, EPSILON, DELTA, MechanismParams(sigma, DEMO_Q, DEMO_K),
                    DEMO_LAM)
    if _stale(public_dir, backend.space, "public", VALIDATION_PUBLIC_SPLITS, say):
        _build(public_dir, backend, [data / name for name in VALIDATION_PUBLIC_SPLITS], None,
               "public", say)
    private, public = EmbeddingIndex.open(private_dir), EmbeddingIndex.open(public_dir)
    overlap = {m.get("concept") for m in private.metadata or []} & held
    if overlap:
        raise InvalidParameterError(f"the validation private index holds {len(overlap)} "
                                    "held-out concepts")
    return {"private": str(private_dir), "holdout": str(holdout_dir), "public": str(public_dir),
            "n_private": private.n, "n_public": public.n,
            "n_holdout": len(_rows(holdout_dir)), "space": backend.space.to_dict()}
