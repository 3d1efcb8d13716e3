"""The on-disk embedding index: validation, normalisation, atomic (re)builds, memmapped reads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dprdm.errors import EmbeddingIndexError, InvalidParameterError
from dprdm.retrieval import store
from dprdm.retrieval.store import EmbeddingIndex, build_index, load_embeddings


def random_matrix(n: int = 50, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def leftovers(parent: Path) -> list[str]:
    """Hidden staging / retired directories that a build left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- building and opening ---------------------------------------------------------------------


def test_build_writes_normalised_memmapped_index(tmp_path: Path) -> None:
    matrix = random_matrix()
    index = build_index(matrix, tmp_path / "idx")
    assert (index.n, index.dim, index.dtype) == (50, 16, np.dtype("float32"))
    assert isinstance(index.vectors, np.memmap) and index.vectors.mode == "r"
    with pytest.raises(ValueError):
        index.vectors[0, 0] = 1.0  # read-only
    norms = np.linalg.norm(index.vectors, axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-6)
    expected = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    np.testing.assert_allclose(index.vectors, expected, atol=1e-6)
    assert index.ids == list(range(50))
    assert index.metadata is None

    on_disk = np.load(tmp_path / "idx" / "embeddings.npy", mmap_mode="r")
    assert on_disk.shape == (50, 16)
    manifest = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert manifest["format_version"] == 1 and manifest["normalized"] is True
    assert (manifest["n"], manifest["dim"], manifest["dtype"]) == (50, 16, "float32")
    assert manifest["created"].endswith("Z")
    assert leftovers(tmp_path) == []


def test_ids_metadata_roundtrip(tmp_path: Path) -> None:
    ids = [f"img-{i}" for i in range(5)]
    metadata = [{"caption": f"a photo {i}", "w": i} for i in range(5)]
    build_index(random_matrix(5), tmp_path / "idx", ids=ids, metadata=metadata)
    index = EmbeddingIndex.open(tmp_path / "idx")
    assert index.ids == ids
    assert index.metadata == metadata
    assert index.info()["has_metadata"] is True


def test_float16_storage(tmp_path: Path) -> None:
    matrix = random_matrix(40, 32)
    index = build_index(matrix, tmp_path / "idx", dtype="float16")
    assert index.dtype == np.float16
    assert index.info()["bytes"] == 40 * 32 * 2
    # Normalised, scaled down by the worst-case rounding, then cast: norm in [1 - 2^-10, 1].
    norms = np.linalg.norm(index.vectors.astype(np.float64), axis=1)
    assert np.all(norms <= 1.0) and np.all(norms >= 1.0 - 2.0**-10)
    rows = index.rows_float32(np.array([3, 0, 3]))
    assert rows.dtype == np.float32 and rows.shape == (3, 32)
    np.testing.assert_array_equal(rows[0], index.vectors[3].astype(np.float32))


def _float16_test_rows(dim: int, seed: int) -> np.ndarray:
    """Random rows plus rows whose rounding is hard: one-hot, equal entries, heavy-tailed
    entries, and rows with many tiny (float16-subnormal) entries."""
    rng = np.random.default_rng(seed)
    gaussian = rng.standard_normal((400, dim))
    heavy = rng.standard_cauchy((100, dim))
    tiny = np.concatenate([np.ones((50, 1)), rng.uniform(1e-6, 1e-4, (50, dim - 1))], axis=1)
    flat = np.ones((2, dim)) * np.array([[1.0], [-1.0]])
    one_hot = np.eye(dim)[: min(dim, 20)]
    return np.concatenate([gaussian, heavy, tiny, flat, one_hot])


@pytest.mark.parametrize("dim", [2, 3, 64, 100, 512, 768, 1024, 1280])
def test_float16_rows_never_exceed_norm_one_as_stored(tmp_path: Path, dim: int) -> None:
    matrix = _float16_test_rows(dim, seed=dim)
    index = build_index(matrix, tmp_path / "idx", dtype="float16")
    stored = np.asarray(index.vectors).astype(np.float64)  # exactly the float16 values
    norms = np.sqrt(np.einsum("ij,ij->i", stored, stored))
    assert norms.max() <= 1.0
    assert norms.min() >= 1.0 - 1e-2
    # Still the same directions (cosine to the input well within float16 precision).
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    assert np.min(np.einsum("ij,ij->i", stored, unit) / norms) > 1 - 1e-5


def test_float16_cast_of_many_random_rows_never_exceeds_norm_one() -> None:
    rng = np.random.default_rng(11)
    for dim in (64, 65, 511, 512, 1280):
        unit, _ = store.normalize_rows(rng.standard_normal((4000, dim)))
        wide = store.to_storage_rows(unit, np.dtype("float16")).astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", wide, wide))
        assert norms.max() <= 1.0 and norms.min() >= 1.0 - 1e-2


def test_the_release_clamps_a_tampered_embeddings_file(tmp_path: Path) -> None:
    """Rows x50 written over embeddings.npy (same shape and dtype) are clamped to norm 1 at
    release: opened through EmbeddingIndex directly, i.e. with no integrity check."""
    from dprdm.privacy import InMemoryLedger, MechanismParams, PrivateRetrieval

    dim, sigma = 32, 1e-2  # small noise; 20 queries stay inside the supported budget
    index = build_index(random_matrix(60, dim, seed=4), tmp_path / "idx")
    tampered = np.asarray(index.vectors) * 50
    np.save(tmp_path / "idx" / "embeddings.npy", tampered.astype(np.float32))
    index = EmbeddingIndex.open(tmp_path / "idx")
    assert np.linalg.norm(index.vectors, axis=1).min() > 49
    for q in (1.0, 0.5):
        mech = PrivateRetrieval(index, MechanismParams(sigma, q, 3),
                                InMemoryLedger(epsilon=1e6, delta=1e-5))
        released = mech.release(tampered[:20])
        # The aggregate has norm <= 1; the noise adds at most ~6 sigma sqrt(d).
        assert np.linalg.norm(released, axis=1).max() <= 1 + 6 * sigma * np.sqrt(dim)
    # Without the clamp, q = 1 would release the mean of 3 rows of norm 50, near 50 x 1.
    assert np.linalg.norm(released, axis=1).max() < 1.5


def test_extreme_magnitudes_and_integer_input_normalise(tmp_path: Path) -> None:
    matrix = np.array([[1e30, -2e30, 2e30], [1e-30, 0.0, -1e-30], [3, 4, 0]], dtype=np.float64)
    index = build_index(matrix, tmp_path / "a")
    np.testing.assert_allclose(index.vectors[0], [1 / 3, -2 / 3, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(index.vectors[1], [2**-0.5, 0, -(2**-0.5)], rtol=1e-6)
    index = build_index(np.array([[3, 4], [0, 7]]), tmp_path / "b")
    np.testing.assert_allclose(index.vectors, [[0.6, 0.8], [0, 1]], rtol=1e-6)
    # Signed zeros are canonicalised: equal vectors are bitwise equal.
    assert not np.signbit(index.vectors[1, 0])


def test_progress_callback_reaches_total(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "BLOCK_ELEMENTS", 16 * 7)  # 7 rows per block
    calls: list[tuple[int, int]] = []
    index = build_index(random_matrix(50), tmp_path / "idx",
                        progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (50, 50) and len(calls) == 8
    np.testing.assert_allclose(np.linalg.norm(index.vectors, axis=1), 1.0, atol=1e-6)


# --- rejected input ---------------------------------------------------------------------------


def test_bad_rows_are_named_and_nothing_is_written(tmp_path: Path) -> None:
    matrix = random_matrix()
    matrix[3, 2] = np.nan
    matrix[7, 0] = np.inf
    matrix[11] = 0.0
    with pytest.raises(InvalidParameterError) as caught:
        build_index(matrix, tmp_path / "idx")
    message = str(caught.value)
    assert "3 embedding rows" in message
    assert "non-finite values in rows 3, 7" in message and "zero norm in row 11" in message
    assert "nan" not in message.lower().replace("cannot", "")  # no values in the message
    assert not (tmp_path / "idx").exists() and leftovers(tmp_path) == []


def test_bad_rows_message_lists_first_twenty_and_count(tmp_path: Path) -> None:
    matrix = random_matrix(60)
    matrix[10:35] = 0.0
    with pytest.raises(InvalidParameterError) as caught:
        build_index(matrix, tmp_path / "idx")
    message = str(caught.value)
    assert "rows 10, 11," in message and ", 29, ..." in message
    assert "30" not in message.split("...")[0]
    assert "(25 rows in total)" in message


@pytest.mark.parametrize(
    "bad",
    [np.zeros(5), np.zeros((2, 3, 4)), np.zeros((0, 4)), np.zeros((4, 0)),
     np.array([["a", "b"]]), np.ones((2, 2), dtype=bool), np.ones((2, 2), dtype=complex)],
)
def test_bad_shapes_and_dtypes_rejected(tmp_path: Path, bad: np.ndarray) -> None:
    with pytest.raises(InvalidParameterError):
        build_index(bad, tmp_path / "idx")
    assert not (tmp_path / "idx").exists()


def test_bad_ids_and_metadata_rejected(tmp_path: Path) -> None:
    matrix = random_matrix(4)
    out = tmp_path / "idx"
    with pytest.raises(InvalidParameterError, match=r"rows 2, 3 repeat an earlier id") as caught:
        build_index(matrix, out, ids=["secret-a", "b", "secret-a", "b"])
    assert "secret" not in str(caught.value)
    with pytest.raises(InvalidParameterError, match="3 ids for 4"):
        build_index(matrix, out, ids=["a", "b", "c"])
    with pytest.raises(InvalidParameterError, match="not a mix"):
        build_index(matrix, out, ids=["a", 1, "c", 2])
    with pytest.raises(InvalidParameterError, match="row 1"):
        build_index(matrix, out, ids=[0, True, 2, 3])
    with pytest.raises(InvalidParameterError, match="3 metadata entries for 4"):
        build_index(matrix, out, metadata=[{}, {}, {}])
    with pytest.raises(InvalidParameterError, match="metadata row 2"):
        build_index(matrix, out, metadata=[{}, {}, {"x": object()}, {}])
    with pytest.raises(InvalidParameterError, match="dtype"):
        build_index(matrix, out, dtype="int8")
    assert not out.exists() and leftovers(tmp_path) == []


# --- overwrite rules and atomicity ------------------------------------------------------------


def test_existing_directory_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build_index(random_matrix(10), out)
    with pytest.raises(EmbeddingIndexError, match="already exists"):
        build_index(random_matrix(20), out)
    assert EmbeddingIndex.open(out).n == 10
    assert build_index(random_matrix(20), out, overwrite=True).n == 20
    assert EmbeddingIndex.open(out).n == 20
    assert leftovers(tmp_path) == []


def test_overwrite_refused_when_ledger_present(tmp_path: Path) -> None:
    out = tmp_path / "idx"
    build_index(random_matrix(10), out)
    (out / "ledger.sqlite").write_bytes(b"budget")
    assert EmbeddingIndex.open(out).info()["has_ledger"] is True
    with pytest.raises(EmbeddingIndexError, match="privacy ledger") as caught:
        build_index(random_matrix(20), out, overwrite=True)
    assert "budget" in str(caught.value)
    assert EmbeddingIndex.open(out).n == 10
    assert (out / "ledger.sqlite").read_bytes() == b"budget"
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_foreign_directories(tmp_path: Path) -> None:
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(EmbeddingIndexError, match="neither empty nor a dprdm index"):
        build_index(random_matrix(5), foreign, overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(EmbeddingIndexError, match="not a directory"):
        build_index(random_matrix(5), tmp_path / "file", overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_index(random_matrix(5), empty, overwrite=True).n == 5


def test_crash_mid_write_keeps_old_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "idx"
    old = build_index(random_matrix(10, seed=1), out)
    old_vectors = np.array(old.vectors)

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(store, "_write_ids", crash)
    with pytest.raises(RuntimeError):
        build_index(random_matrix(20, seed=2), out, overwrite=True)
    reopened = EmbeddingIndex.open(out)
    assert reopened.n == 10
    np.testing.assert_array_equal(reopened.vectors, old_vectors)
    assert leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        build_index(random_matrix(20), tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists() and leftovers(tmp_path) == []


def test_failed_swap_restores_old_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "idx"
    build_index(random_matrix(10), out)
    real_rename = os.rename
    calls = []

    def flaky_rename(src: object, dst: object) -> None:
        calls.append((src, dst))
        if len(calls) == 2:  # 1: old index moved away; 2: new index moved in
            raise OSError("simulated failure")
        real_rename(src, dst)

    monkeypatch.setattr(store.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="simulated"):
        build_index(random_matrix(20), out, overwrite=True)
    monkeypatch.undo()
    assert EmbeddingIndex.open(out).n == 10
    assert leftovers(tmp_path) == []


# --- opening and reading ----------------------------------------------------------------------


def test_open_validates_manifest_against_array(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingIndexError, match="no embedding index"):
        EmbeddingIndex.open(tmp_path / "missing")
    out = tmp_path / "idx"
    build_index(random_matrix(10), out)
    manifest_path = out / "index.json"
    manifest = json.loads(manifest_path.read_text())
    for key, value, pattern in [("n", 11, "shape"), ("dtype", "float16", "dtype"),
                                ("format_version", 99, "format_version"),
                                ("normalized", False, "normalised")]:
        manifest_path.write_text(json.dumps({**manifest, key: value}))
        with pytest.raises(EmbeddingIndexError, match=pattern):
            EmbeddingIndex.open(out)
    manifest_path.write_text("{not json")
    with pytest.raises(EmbeddingIndexError, match="not valid JSON"):
        EmbeddingIndex.open(out)


def test_rows_float32_gathers_and_rejects_padding(tmp_path: Path) -> None:
    index = build_index(random_matrix(10), tmp_path / "idx")
    rows = index.rows_float32(np.array([9, 2, 2], dtype=np.int64))
    np.testing.assert_array_equal(rows, np.asarray(index.vectors)[[9, 2, 2]])
    assert index.rows_float32(np.zeros(0, np.int64)).shape == (0, 16)
    with pytest.raises(InvalidParameterError, match="padding"):
        index.rows_float32(np.array([0, -1]))
    with pytest.raises(InvalidParameterError, match=r"\[0, 10\)"):
        index.rows_float32(np.array([10]))
    with pytest.raises(InvalidParameterError):
        index.rows_float32(np.array([0.5]))


def test_info(tmp_path: Path) -> None:
    index = build_index(random_matrix(10), tmp_path / "idx", dtype="float32")
    info = index.info()
    assert info["n"] == 10 and info["dim"] == 16 and info["bytes"] == 640
    assert info["has_ledger"] is False and info["quantizer"] is None
    json.dumps(info)


def test_load_embeddings(tmp_path: Path) -> None:
    matrix = random_matrix(6)
    np.save(tmp_path / "a.npy", matrix)
    loaded = load_embeddings(tmp_path / "a.npy")
    assert isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, matrix)
    np.savez(tmp_path / "one.npz", emb=matrix)
    np.testing.assert_array_equal(load_embeddings(tmp_path / "one.npz"), matrix)
    np.savez(tmp_path / "two.npz", a=matrix, b=matrix)
    with pytest.raises(InvalidParameterError, match="2 arrays"):
        load_embeddings(tmp_path / "two.npz")
    with pytest.raises(InvalidParameterError, match="no embeddings file"):
        load_embeddings(tmp_path / "nope.npy")
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(InvalidParameterError, match=".npy or .npz"):
        load_embeddings(tmp_path / "x.csv")
    (tmp_path / "junk.npy").write_bytes(b"junk")
    with pytest.raises(InvalidParameterError, match="not a readable"):
        load_embeddings(tmp_path / "junk.npy")
