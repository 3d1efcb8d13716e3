"""Validation domains: a real public style held out of training and treated as "private".

Recipes (generator, encoder, augmentations, guidance, lam) are chosen on a domain that is not
the demo's private OpenMoji. A :class:`ValidationDomain` names the held-out style, the public
collections a generator may train on while it is held out (the public index, and the style
judge's negatives) and the shipped judge that scores it. Two are registered in :data:`DOMAINS`:

* ``fluent_hc`` (the default): Fluent Emoji High Contrast, black line art without colour, far
  from every colour style the generators train on; its judge tells it from them almost perfectly,
  so "the DP generations look like the private style" can be seen. 234 of the 243 OpenMoji
  held-out concepts have an image.
* ``emojione``: EmojiOne 2, colour drawings close to the public styles; its judge calls a
  fifth of raw public images EmojiOne (recall 79 %), so it hardly sees style.
  Kept to reproduce the numbers chosen on it (163 held-out concepts, EmojiOne stops at Unicode 9).

Noto cannot serve: every shipped network starts from weights trained on it. Owns building, under
``.dprdm-demo/validation/DOMAIN/`` (:mod:`dprdm.demo_layout`):

* ``private/`` -- a private index + ledger of the held-out style's images whose concept is NOT
  one of the OpenMoji held-out concepts, embedded with the image tower that ``dprdm eval`` uses,
  the mechanism pinned as the demo's own private index pins it (:mod:`dprdm.demo`);
* ``holdout/`` -- its images OF the OpenMoji held-out concepts + ``captions.jsonl`` (the prompts
  and the reference set), laid out like ``.dprdm-demo/holdout``;
* ``public/``  -- the domain's public index (its public splits), no ledger.

Both indexes record the image tower they were embedded with (``conditioning_space.json``); when
the tower changes (a retrained demo encoder) they are deleted and rebuilt, and this says so: a
rebuilt private index is a new data set with a new ledger. ``dprdm eval --demo --validation
[--validation-domain NAME]`` calls :func:`prepare_validation` (builds only what is missing or
stale) and scores with the domain's judge (:mod:`dprdm.evaluation.judge`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dprdm import demo_layout
from dprdm.data.emoji import SPLITS
from dprdm.errors import DprdmError, InvalidParameterError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class ValidationDomain:
    """A held-out public style (`split`), the public splits beside it, and its judge's folder."""

    split: str
    public_splits: tuple[str, ...]
    judge: str  # the shipped judge: a folder under dprdm/weights

    @property
    def title(self) -> str:  # for reports: "Fluent High Contrast"
        return SPLITS[self.split][1].title

    @property
    def public_titles(self) -> str:
        return " + ".join(SPLITS[name][1].title for name in self.public_splits)

    @property
    def judge_dir(self) -> Path:
        return WEIGHTS_DIR / self.judge


DOMAINS: dict[str, ValidationDomain] = {
    # every public collection the issue-18 generators train on, and EmojiOne
    "fluent_hc": ValidationDomain("fluent_hc", ("twemoji", "google", "fluent", "fluent3d",
                                                "blob", "emojione"),
                                  "validation-judge-fluent-hc"),
    # the first validation domain (sessions 6-9): EmojiOne against the shipped encoder's styles
    "emojione": ValidationDomain("emojione", ("twemoji", "google", "fluent"), "validation-judge"),
}
DEFAULT_DOMAIN = "fluent_hc"


def domain_named(name: str | None = None) -> ValidationDomain:
    """The registered domain called `name` (the default one for None), or a clear error."""
    name = DEFAULT_DOMAIN if name is None else name
    if name not in DOMAINS:
        raise InvalidParameterError(f"unknown validation domain {name!r}; choose from "
                                    f"{', '.join(DOMAINS)}")
    return DOMAINS[name]


CAPTIONS = "captions.jsonl"

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


def holdout_rows(root: Path, domain: ValidationDomain) -> list[dict[str, Any]]:
    """The domain's captions rows of the OpenMoji held-out concepts, in the split's order."""
    concepts = openmoji_holdout_concepts(root)
    return [row for row in _rows(root / "data" / domain.split) if row["concept"] in concepts]


def write_holdout(root: Path, out: Path, domain: ValidationDomain) -> int:
    """Copy the domain's held-out images and their captions rows into `out` (all or nothing)."""
    rows = holdout_rows(root, domain)
    if not rows:
        raise DprdmError(f"no {domain.title} image of an OpenMoji held-out concept: is the "
                         "demo data whole?")
    source = root / "data" / domain.split
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


def _holdout_complete(root: Path, out: Path, domain: ValidationDomain) -> bool:
    if not (out / CAPTIONS).is_file():
        return False
    expected = holdout_rows(root, domain)
    return (_rows(out) == expected
            and all((out / row["file"]).is_file() for row in expected))


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
    from dprdm.demo import load_folders
    from dprdm.generation.backends.base import SPACE_FILE
    from dprdm.retrieval import build_index

    images, ids, metadata = load_folders(folders, keep)
    embeddings = backend.embed_images(images)
    index = build_index(embeddings, index_dir, ids=ids, metadata=metadata,
                        extra_files={SPACE_FILE: backend.space.to_bytes()})
    say(f"validation {what} index: built {index_dir} ({index.n} records, d={index.dim})")


def prepare_validation(backend, root: Path | None = None, say: Say = print,
                       domain: str | None = None) -> dict[str, Any]:
    """Build what is missing or stale of validation `domain` (default :data:`DEFAULT_DOMAIN`)
    under ``root/validation/DOMAIN``.

    `backend` is the generator backend ``dprdm eval`` uses (its image tower embeds the images;
    its space's fingerprint is recorded). Prepares the demo data splits it needs first (npm,
    only when they are missing). Returns the three directories and their sizes.
    """
    from dprdm.data.emoji import prepare_demo_data
    from dprdm.demo import DEMO_K, DEMO_LAM, DEMO_Q, DEMO_QUERIES, DELTA, EPSILON
    from dprdm.privacy import MechanismParams, accounting, init_budget
    from dprdm.retrieval import EmbeddingIndex

    name = DEFAULT_DOMAIN if domain is None else domain
    chosen = domain_named(name)
    root = Path(root) if root is not None else demo_layout.demo_root()
    prepare_demo_data(root, splits=(chosen.split, "openmoji_private", "holdout",
                                    *chosen.public_splits), show_progress=False)
    holdout_dir = demo_layout.validation_holdout_dir(root, name)
    private_dir = demo_layout.validation_private_index_dir(root, name)
    public_dir = demo_layout.validation_public_index_dir(root, name)
    holdout_dir.parent.mkdir(parents=True, exist_ok=True)
    if not _holdout_complete(root, holdout_dir, chosen):
        count = write_holdout(root, holdout_dir, chosen)
        say(f"validation held-out set: wrote {holdout_dir} ({count} {chosen.title} images)")
    held = openmoji_holdout_concepts(root)
    data = root / "data"

    if _stale(private_dir, backend.space, "private", (chosen.split,), say):
        _build(private_dir, backend, [data / chosen.split],
               lambda extra: extra.get("concept") not in held, "private", say)
        sigma = accounting.calibrate_sigma(EPSILON, DEMO_Q, DEMO_K, DEMO_QUERIES, DELTA)
        init_budget(private_dir, EPSILON, DELTA, MechanismParams(sigma, DEMO_Q, DEMO_K),
                    DEMO_LAM)
    if _stale(public_dir, backend.space, "public", chosen.public_splits, say):
        _build(public_dir, backend, [data / split for split in chosen.public_splits], None,
               "public", say)
    private, public = EmbeddingIndex.open(private_dir), EmbeddingIndex.open(public_dir)
    overlap = {m.get("concept") for m in private.metadata or []} & held
    if overlap:
        raise InvalidParameterError(f"the validation private index holds {len(overlap)} "
                                    "held-out concepts")
    return {"domain": name, "title": chosen.title, "public_titles": chosen.public_titles,
            "judge": str(chosen.judge_dir),
            "private": str(private_dir), "holdout": str(holdout_dir), "public": str(public_dir),
            "n_private": private.n, "n_public": public.n,
            "n_holdout": len(_rows(holdout_dir)), "space": backend.space.to_dict()}
