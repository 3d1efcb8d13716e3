"""How much of a PUBLIC vector set nearly duplicates the records of a PRIVATE index.

A coarse quantizer must be trained on public data only (the searched candidate set may not
depend on private records). A copy of the private embeddings with a little noise added, or the
private images embedded a second time, passes an exact-equality test; this module counts near-
duplicates instead: public rows with some private row at cosine similarity above
:data:`NEAR_DUPLICATE_COSINE`. :func:`dprdm.retrieval.search.train_public_quantizer` refuses the
public set when more than :data:`MAX_NEAR_DUPLICATE_FRACTION` of its rows are near-duplicates
(a public collection may legitimately share a few images with a private one).

The private rows are read only to compare, block by block; the result is a count about the PUBLIC
rows and never says which private rows matched.

Small problems are compared exactly (faiss ``IndexFlatIP`` range search over the public rows, the
private rows as queries). Large ones (more than :data:`EXACT_WORK_LIMIT` multiply-adds) use an
inverted file over the public rows with its own k-means of the public rows and :data:`IVF_NPROBE`
probed lists per private row: a pair at cosine > 0.999 is ~0.045 apart and all but always shares
one of the four nearest cells, so the count is at most a hair low, which a fraction threshold does
not notice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import numpy.typing as npt

from dprdm.retrieval.store import EmbeddingIndex

NEAR_DUPLICATE_COSINE = 0.999
MAX_NEAR_DUPLICATE_FRACTION = 0.01
EXACT_WORK_LIMIT = 5e10  # public rows x private rows x dim at most for the exact comparison
IVF_NPROBE = 4
PRIVATE_BLOCK_ROWS = 4096  # private rows compared at once (bounds a range search's result size)


@dataclass(frozen=True)
class NearDuplicates:
    """How many of `n_public` public rows have a private row at cosine > `threshold`."""

    n_public: int
    n_near: int
    threshold: float
    exact: bool  # False: counted through an inverted file (see the module docstring)
    complete: bool  # False: counting stopped early, n_near is a lower bound

    @property
    def fraction(self) -> float:
        return self.n_near / self.n_public if self.n_public else 0.0


def _public_ivf(public: npt.NDArray[np.float32],
                seed: int) -> tuple[faiss.IndexIVFFlat, faiss.IndexFlatIP]:
    """An inverted file over the public rows (and its coarse quantizer, which must outlive it)."""
    n, dim = public.shape
    nlist = max(1, min(int(math.sqrt(n)), n // 39))  # faiss wants >= 39 points per centroid
    kmeans = faiss.Kmeans(dim, nlist, niter=10, seed=seed, spherical=True, verbose=False,
                          max_points_per_centroid=64)
    kmeans.train(public)
    coarse = faiss.IndexFlatIP(dim)
    coarse.add(kmeans.centroids)
    index = faiss.IndexIVFFlat(coarse, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.add(public)
    index.nprobe = min(IVF_NPROBE, nlist)
    return index, coarse


def count_public_near_duplicates(
    public_unit: npt.ArrayLike,
    private_index: EmbeddingIndex,
    *,
    threshold: float = NEAR_DUPLICATE_COSINE,
    stop_above: int | None = None,
    exact_work_limit: float = EXACT_WORK_LIMIT,
    seed: int = 0,
) -> NearDuplicates:
    """Count the unit-norm public rows that have a private row at cosine similarity > threshold.

    Stops early once more than `stop_above` public rows are found (the caller refuses anyway).
    """
    public = np.ascontiguousarray(public_unit, dtype=np.float32)
    n_public, dim = public.shape
    exact = n_public * private_index.n * dim <= exact_work_limit
    if exact:
        index: faiss.Index = faiss.IndexFlatIP(dim)
        index.add(public)
        coarse = None
    else:
        index, coarse = _public_ivf(public, seed)  # `coarse` kept referenced while searching
    near = np.zeros(n_public, dtype=bool)
    complete = True
    for _, block in private_index.iter_blocks(PRIVATE_BLOCK_ROWS):
        _, _, matches = index.range_search(np.ascontiguousarray(block), float(threshold))
        near[matches] = True
        if stop_above is not None and int(near.sum()) > stop_above:
            complete = False
            break
    del index, coarse
    return NearDuplicates(n_public, int(near.sum()), float(threshold), exact, complete)


__all__ = [
    "EXACT_WORK_LIMIT", "MAX_NEAR_DUPLICATE_FRACTION", "NEAR_DUPLICATE_COSINE", "NearDuplicates",
    "count_public_near_duplicates",
]
