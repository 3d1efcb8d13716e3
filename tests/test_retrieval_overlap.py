"""dprdm.retrieval.overlap: counting public rows that nearly duplicate private records."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dprdm.retrieval import build_index
from dprdm.retrieval.overlap import count_public_near_duplicates


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_and_inverted_file_counts_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    private = unit(rng.standard_normal((3000, 32)))
    index = build_index(private, tmp_path / "idx", dtype="float16")
    # 60 near-copies (cosine ~0.9998), two of them of the same private row, 20 rows at cosine
    # ~0.99 (not near enough), the rest unrelated
    near = unit(private[[*range(59), 0]] + 0.003 * rng.standard_normal((60, 32)))
    far = unit(private[100:120] + 0.025 * rng.standard_normal((20, 32)))
    cosines_far = np.sum(far * private[100:120], axis=1)
    assert cosines_far.max() < 0.999
    public = np.concatenate([unit(rng.standard_normal((1920, 32))), near, far])
    exact = count_public_near_duplicates(public, index)
    assert exact.exact and exact.complete
    assert (exact.n_public, exact.n_near) == (2000, 60) and exact.fraction == 0.03
    approximate = count_public_near_duplicates(public, index, exact_work_limit=0)
    assert not approximate.exact and approximate.n_near == 60
    early = count_public_near_duplicates(public, index, stop_above=20)
    assert not early.complete and 20 < early.n_near <= 60


def test_no_overlap_counts_zero(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    index = build_index(rng.standard_normal((500, 16)), tmp_path / "idx")
    public = unit(rng.standard_normal((400, 16)))
    for limit in (5e10, 0):
        assert count_public_near_duplicates(public, index, exact_work_limit=limit).n_near == 0
