"""The operator's stored style estimate of a private index: a DP estimate of where its releases
lie, that one-prompt calls are shrunk towards (docs/privacy.md, "A stored style estimate").

A call of several prompts pools its releases towards their own mean (:func:`pool_releases`). A
call of one prompt (every service request) has nothing to pool with. So the operator spends P
queries once, on prompts of their own choosing (`dprdm budget style-estimate`): the P releases
are charged like any other, and their mean is stored in the index directory. From then on every
call's releases are shrunk towards it (:func:`~dprdm.conditioning.shrink_towards`): free
post-processing, since the estimate is a function of releases already charged and its noise is
independent of every later release's.

Made by the operator only, from operator prompts: no client's queries shape the condition
another client gets, and the service has no way to make or change one. The file is written
atomically and bound to the ledger that paid for it (its ledger id); it holds a released,
noised vector and the public figures of the releases, nothing pre-noise.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from dprdm.errors import InvalidParameterError
from dprdm.files import write_bytes_atomically

FILENAME = "style-estimate.safetensors"
FORMAT = "dprdm-style-estimate-1"
MIN_RELEASES = 2  # an estimate of one release is that release: no better than none
MAX_RELEASES = 10_000


@dataclass(frozen=True)
class StyleEstimate:
    """The mean of `releases` charged releases of one ledger, and what they were made with."""

    vector: np.ndarray  # float64 (d,)
    ledger_id: str
    releases: int
    sigma: float
    q: float
    k: int
    created: str
    prompts_sha256: str

    @property
    def dim(self) -> int:
        return int(self.vector.shape[0])

    def describe(self) -> dict:
        """Public figures only (no vector, a hash of it): what `budget show` and reports print,
        and what a synthesis job records to know its estimate again."""
        digest = hashlib.sha256(np.ascontiguousarray(self.vector, dtype="<f8").tobytes())
        return {"releases": self.releases, "sigma": self.sigma, "q": self.q, "k": self.k,
                "created": self.created, "ledger_id": self.ledger_id,
                "sha256": digest.hexdigest()[:16]}


def read_operator_prompts(path: Path) -> list[str]:
    """The operator's prompts, read and checked as a synthesis job's prompt file is
    (:func:`dprdm.synthesis.read_prompts`: .txt, .csv/.tsv or .jsonl; bad lines named), and
    between MIN_RELEASES and MAX_RELEASES of them."""
    from dprdm.synthesis import read_prompts

    prompts = [row.prompt for row in read_prompts(path).rows]
    if not MIN_RELEASES <= len(prompts) <= MAX_RELEASES:
        raise InvalidParameterError(f"{path} holds {len(prompts)} prompts; a style estimate "
                                    f"takes {MIN_RELEASES} to {MAX_RELEASES:,} (one query each)")
    return prompts


def estimate_style(rag, prompts: list[str], caller: str = "cli:budget style-estimate",
                   receipts: list | None = None) -> StyleEstimate:
    """Charge one query per prompt (all at once: refused whole when the budget cannot take them)
    and return the mean of the releases. `rag` is a RetrievalAugmentedGenerator with a private
    index; its ledger is the one the estimate is bound to."""
    if rag.mechanism is None:
        raise InvalidParameterError("a style estimate needs a private index and its ledger")
    if not MIN_RELEASES <= len(prompts) <= MAX_RELEASES:
        raise InvalidParameterError(f"a style estimate takes {MIN_RELEASES} to "
                                    f"{MAX_RELEASES:,} prompts, got {len(prompts)}")
    if any(not isinstance(p, str) or not p.strip() for p in prompts):
        raise InvalidParameterError("every prompt of a style estimate must be non-empty text")
    text = rag.backend.embed_prompts(list(prompts))
    released = rag.mechanism.release(text, caller=caller, receipts=receipts)  # charged first
    settings = rag.settings
    digest = hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()
    return StyleEstimate(vector=np.asarray(released, dtype=np.float64).mean(axis=0),
                         ledger_id=str(getattr(rag.ledger, "ledger_id", "")),
                         releases=len(prompts), sigma=settings.sigma, q=settings.q,
                         k=settings.k,
                         created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         prompts_sha256=digest)


def path_of(index_dir: Path) -> Path:
    return Path(index_dir) / FILENAME


def save_style_estimate(index_dir: Path, estimate: StyleEstimate) -> Path:
    """Write the estimate into the index directory atomically (the old file or the new one)."""
    from safetensors.numpy import save

    metadata = {"format": FORMAT, "ledger_id": estimate.ledger_id,
                "releases": str(estimate.releases), "sigma": repr(estimate.sigma),
                "q": repr(estimate.q), "k": str(estimate.k), "created": estimate.created,
                "prompts_sha256": estimate.prompts_sha256}
    path = path_of(index_dir)
    write_bytes_atomically(path, save({"mean_release": estimate.vector}, metadata=metadata))
    return path


def load_style_estimate(index_dir: Path, ledger_id: str, dim: int) -> StyleEstimate | None:
    """The index's estimate, or None when it has none. Refused (a clear error) when the file is
    unreadable, was paid for by another ledger, or does not fit the index's dimension."""
    from safetensors import SafetensorError, safe_open

    path = path_of(index_dir)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            vector = handle.get_tensor("mean_release")
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}")
        estimate = StyleEstimate(
            vector=np.asarray(vector, dtype=np.float64), ledger_id=metadata["ledger_id"],
            releases=int(metadata["releases"]), sigma=float(metadata["sigma"]),
            q=float(metadata["q"]), k=int(metadata["k"]), created=metadata["created"],
            prompts_sha256=metadata["prompts_sha256"])
    except (OSError, SafetensorError, KeyError, ValueError) as error:
        raise InvalidParameterError(f"{path} is not a readable dprdm style estimate ({error}); "
                                    "remove it, or make a new one with `dprdm budget "
                                    "style-estimate --replace`") from error
    if estimate.vector.shape != (dim,) or not np.all(np.isfinite(estimate.vector)):
        raise InvalidParameterError(f"{path} holds a vector of shape {estimate.vector.shape}, "
                                    f"the index's releases have {dim} dimensions")
    if estimate.ledger_id != ledger_id:
        raise InvalidParameterError(
            f"{path} was paid for by ledger {estimate.ledger_id}, this index's ledger is "
            f"{ledger_id}: remove it, or make a new one with `dprdm budget style-estimate "
            "--replace`")
    if not (estimate.releases >= MIN_RELEASES and math.isfinite(estimate.sigma)):
        raise InvalidParameterError(f"{path} records {estimate.releases} releases: not an "
                                    "estimate dprdm makes")
    return estimate
