"""The IVF partition saved in the index directory: equal to the recomputed one, reused on open
(memory-mapped, no re-assignment), detected when stale, written atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dprdm.cli import app
from dprdm.errors import InvalidParameterError
from dprdm.privacy import MechanismParams, SqliteLedger, init_budget
from dprdm.retrieval import (
    EmbeddingIndex,
    FaissIVFSearcher,
    IVFPartition,
    PublicQuantizer,
    build_index,
    make_searcher,
    train_public_quantizer,
)
from dprdm.retrieval import partition as partition_module
from dprdm.retrieval.partition import StalePartitionError
from dprdm.retrieval.store import MANIFEST_FILE, PARTITION_MANIFEST_FILE

DIM = 16
NLIST = 6


@pytest.fixture()
def quantized(tmp_path: Path) -> tuple[EmbeddingIndex, PublicQuantizer]:
    """An index with its public quantizer and partition saved."""
    rng = np.random.default_rng(11)
    index = build_index(rng.standard_normal((700, DIM)), tmp_path / "idx")
    quantizer = train_public_quantizer(rng.standard_normal((300, DIM)), NLIST, index)
    quantizer.save(index.path)
    IVFPartition(index, quantizer).save()
    return index, quantizer


@pytest.fixture()
def count_assignments(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the full re-assignments of an index's rows to lists."""
    calls: list[int] = []
    original = partition_module.assign_rows

    def counting(index, centroids):
        calls.append(index.n)
        return original(index, centroids)

    monkeypatch.setattr(partition_module, "assign_rows", counting)
    return calls


def partition_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("partition"))


def test_saved_partition_equals_the_recomputed_one(quantized) -> None:
    index, quantizer = quantized
    loaded = IVFPartition.load(index, nprobe=3)
    computed = IVFPartition(index, quantizer, nprobe=3)
    assert loaded.loaded and not computed.loaded
    assert isinstance(loaded.rows, np.memmap) and isinstance(loaded.offsets, np.memmap)
    np.testing.assert_array_equal(loaded.rows, computed.rows)
    np.testing.assert_array_equal(loaded.offsets, computed.offsets)
    np.testing.assert_array_equal(loaded.assignment, computed.assignment)
    # the assignment is every row's canonically nearest centroid
    np.testing.assert_array_equal(
        computed.assignment,
        partition_module.nearest_centroids(index.rows_float32(np.arange(index.n)),
                                           quantizer.centroids, 1)[:, 0])
    queries = np.random.default_rng(3).standard_normal((5, DIM)).astype(np.float32)
    for got, want in zip(loaded.candidate_rows(queries), computed.candidate_rows(queries)):
        np.testing.assert_array_equal(got, want)
    assert index.info()["partition"]["nlist"] == NLIST


def test_open_reuses_the_saved_partition_without_reassigning(quantized,
                                                              count_assignments) -> None:
    index, quantizer = quantized
    reopened = EmbeddingIndex.open(index.path)
    partition = IVFPartition.open(reopened, nprobe=2)
    assert partition.loaded and isinstance(partition.rows, np.memmap)
    ivf = make_searcher(reopened, "ivf", nprobe=2)
    assert isinstance(ivf, FaissIVFSearcher) and ivf.partition.loaded
    assert count_assignments == []
    # the faiss lists built from the saved partition search like ones built from a fresh one
    fresh = FaissIVFSearcher(reopened, quantizer, nprobe=2,
                             partition=IVFPartition(reopened, quantizer))
    queries = np.random.default_rng(4).standard_normal((6, DIM)).astype(np.float32)
    np.testing.assert_array_equal(ivf.ranked_candidates(queries, 40),
                                  fresh.ranked_candidates(queries, 40))
    for list_no in range(NLIST):
        np.testing.assert_array_equal(ivf.list_members(list_no),
                                      partition.list_members(list_no))


def test_a_replaced_quantizer_makes_the_partition_stale(quantized, count_assignments) -> None:
    index, _ = quantized
    other = train_public_quantizer(np.random.default_rng(5).standard_normal((300, DIM)), NLIST,
                                   index, seed=99)
    other.save(index.path)  # a new quantizer, the old partition still on disk
    with pytest.raises(StalePartitionError, match="centroids_sha256"):
        IVFPartition.load(index)
    notes: list[str] = []
    partition = IVFPartition.open(index, notice=notes.append)  # recomputed once, then saved
    assert count_assignments == [index.n] and not partition.loaded
    assert len(notes) == 1 and "stale" in notes[0] and "saved for the next call" in notes[0]
    again = IVFPartition.load(index)
    np.testing.assert_array_equal(again.rows, IVFPartition(index, other).rows)
    assert len(partition_files(index.path)) == 3  # the old generation's files are gone


def test_a_rebuilt_index_makes_the_partition_stale(quantized, tmp_path: Path,
                                                   count_assignments) -> None:
    index, quantizer = quantized
    # same n and dim, other rows; the old quantizer and partition copied in by hand
    rebuilt = build_index(np.random.default_rng(6).standard_normal((index.n, DIM)),
                          tmp_path / "rebuilt")
    for name in partition_files(index.path) + ["quantizer.npy", "quantizer.json"]:
        shutil.copy(index.path / name, rebuilt.path / name)
    with pytest.raises(StalePartitionError, match="other embeddings"):
        IVFPartition.load(rebuilt)
    assert not IVFPartition.open(rebuilt).loaded and count_assignments == [index.n]
    IVFPartition.load(rebuilt)  # saved by open: current now


def test_an_index_without_a_recorded_digest_is_checked_against_its_file(quantized) -> None:
    index, _ = quantized
    manifest_path = index.path / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    recorded = manifest.pop("embeddings_sha256")
    manifest_path.write_text(json.dumps(manifest))  # as written before the digest existed
    legacy = EmbeddingIndex.open(index.path)
    assert legacy.embeddings_sha256 == recorded
    assert IVFPartition.load(legacy).loaded


@pytest.mark.parametrize("damage", ["rows", "offsets", "manifest", "missing"])
def test_a_damaged_partition_is_refused_and_recomputed(quantized, damage: str,
                                                       count_assignments) -> None:
    index, quantizer = quantized
    manifest = json.loads((index.path / PARTITION_MANIFEST_FILE).read_text())
    if damage == "manifest":
        (index.path / PARTITION_MANIFEST_FILE).write_text("{not json")
    elif damage == "missing":
        (index.path / manifest["rows_file"]).unlink()
    else:
        path = index.path / manifest[f"{damage}_file"]
        array = np.load(path)
        array[[0, -1]] = array[[-1, 0]]
        np.save(path, array)
    with pytest.raises(StalePartitionError):
        IVFPartition.load(index)
    partition = IVFPartition.open(index)
    np.testing.assert_array_equal(partition.rows, IVFPartition(index, quantizer).rows)
    assert count_assignments == [index.n, index.n]


def test_a_failed_save_leaves_the_previous_partition(quantized,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    index, quantizer = quantized
    before = partition_files(index.path)
    manifest_before = (index.path / PARTITION_MANIFEST_FILE).read_bytes()
    original = partition_module._write_npy_durably

    def fail_on_offsets(path: Path, array: np.ndarray) -> None:
        if path.name.endswith(".offsets.npy"):
            path.write_bytes(b"\x93NUMPY half")  # a half-written file, then the failure
            raise OSError("disk full")
        original(path, array)

    monkeypatch.setattr(partition_module, "_write_npy_durably", fail_on_offsets)
    with pytest.raises(OSError, match="disk full"):
        IVFPartition(index, quantizer).save()
    assert partition_files(index.path) == before
    assert (index.path / PARTITION_MANIFEST_FILE).read_bytes() == manifest_before

    def fail_on_commit(*args, **kwargs) -> None:
        raise OSError("crash before the commit")

    monkeypatch.setattr(partition_module, "_write_npy_durably", original)
    monkeypatch.setattr(partition_module, "write_bytes_atomically", fail_on_commit)
    with pytest.raises(OSError, match="commit"):
        IVFPartition(index, quantizer).save()
    assert partition_files(index.path) == before
    assert IVFPartition.load(index).loaded
    monkeypatch.undo()
    # files a crash left behind are never read, and the next save removes them
    (index.path / "partition-deadbeef0000.rows.npy").write_bytes(b"junk")
    IVFPartition(index, quantizer).save()
    assert len(partition_files(index.path)) == 3
    assert "partition-deadbeef0000.rows.npy" not in partition_files(index.path)


def test_only_the_index_own_quantizer_is_saved(quantized) -> None:
    index, _ = quantized
    foreign = train_public_quantizer(np.random.default_rng(8).standard_normal((300, DIM)),
                                     NLIST, index, seed=5)
    with pytest.raises(InvalidParameterError, match="not the one saved"):
        IVFPartition(index, foreign).save()
    before = partition_files(index.path)
    assert not IVFPartition.open(index, foreign).loaded  # used from memory, nothing written
    assert partition_files(index.path) == before


def retrieve_args(index_dir: Path, queries: Path, out: Path) -> list[str]:
    """The `dprdm retrieve` command line (one place to adapt when its options change)."""
    return ["retrieve", str(index_dir), "--query-emb", str(queries), "--out", str(out),
            "--strategy", "ivf-subsample", "--nprobe", "2"]


def test_cli_quantize_saves_the_partition_and_retrieve_reuses_it(
        tmp_path: Path, count_assignments) -> None:
    runner = CliRunner()
    rng = np.random.default_rng(9)
    index = build_index(rng.standard_normal((400, DIM)), tmp_path / "idx")
    np.save(tmp_path / "public.npy", rng.standard_normal((200, DIM)))
    result = runner.invoke(app, ["index", "quantize", str(index.path), "--public",
                                 str(tmp_path / "public.npy"), "--nlist", "4", "--data-is-public", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["partition"] == PARTITION_MANIFEST_FILE
    assert count_assignments == [400]
    np.testing.assert_array_equal(IVFPartition.load(index).rows,
                                  IVFPartition(index, PublicQuantizer.load(index.path)).rows)
    init_budget(index.path, 50, 1e-5, MechanismParams(0.5, 0.5, 5))  # the pinned mechanism
    np.save(tmp_path / "q.npy", rng.standard_normal((3, DIM)).astype(np.float32))
    count_assignments.clear()
    for _ in range(2):
        result = runner.invoke(app, retrieve_args(index.path, tmp_path / "q.npy",
                                                  tmp_path / "r.npy"))
        assert result.exit_code == 0, result.output
    assert count_assignments == []  # both calls memory-mapped the saved partition
    assert SqliteLedger(index.path).summary().queries == 6
