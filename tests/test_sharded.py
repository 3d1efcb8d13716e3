"""The sharded index and the sharded mechanism, all shards in this process (no Ray).

The sharded mechanism must be the single-node one on the union of the shards: exactly so at q = 1
(same aggregate, bit for bit, ties across shards broken by global row), and in distribution at
q < 1 (the neighbour sets against the naive Bernoulli mask, as tests/test_sampling.py does).
"""

import json

import numpy as np
import pytest

from dprdm.errors import EmbeddingIndexError, InvalidParameterError
from dprdm.privacy import InMemoryLedger, MechanismParams, PrivateRetrieval
from dprdm.privacy.mechanism import normalise_queries
from dprdm.privacy.sharded import (
    LocalShards,
    ShardedPrivateRetrieval,
    ShardUnavailableError,
)
from dprdm.retrieval import EmbeddingIndex, IVFPartition, build_index, train_public_quantizer
from dprdm.retrieval.search import canonical_scores
from dprdm.retrieval.shards import SHARDS_MANIFEST_FILE, ShardedIndex, shard_index

BIG = dict(epsilon=1e6, delta=1e-5)
N, DIM, NLIST, NPROBE = 60, 8, 6, 2


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """A float16 index with a public quantizer, exact duplicates across shard boundaries (ties
    decided by the global row), and its 3-shard split."""
    root = tmp_path_factory.mktemp("sharded")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, DIM)).astype(np.float32)
    x[45] = x[5]  # shard 0 and shard 2 hold the same vector
    x[25] = x[5]  # and shard 1
    index = build_index(x, root / "idx", ids=[f"r{i}" for i in range(N)], dtype="float16",
                        metadata=[{"i": i} for i in range(N)])
    quantizer = train_public_quantizer(rng.standard_normal((300, DIM)), NLIST, None)
    quantizer.save(index.path)
    IVFPartition(index, quantizer).save()
    return index, shard_index(root / "idx", root / "sharded", 3)


def queries(count, seed=1):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((count, DIM)).astype(np.float32)
    return normalise_queries(q, DIM)


def single(index, strategy, q=1.0, k=4, sigma=1e-3, randomness=None):
    searcher = IVFPartition.open(index, nprobe=NPROBE) if strategy == "probed" else None
    return PrivateRetrieval(index, MechanismParams(sigma, q, k), InMemoryLedger(**BIG),
                            strategy=strategy, searcher=searcher, randomness=randomness)


def sharded(sharded_index, strategy, q=1.0, k=4, sigma=1e-3, ledger=None, backend=None,
            randomness=None):
    return ShardedPrivateRetrieval(backend or LocalShards(sharded_index),
                                   MechanismParams(sigma, q, k), ledger or InMemoryLedger(**BIG),
                                   strategy=strategy, nprobe=NPROBE, randomness=randomness)


# ---- the layout --------------------------------------------------------------------------------

def test_shards_are_byte_slices_of_the_source_with_ids_metadata_and_one_quantizer(indexes):
    index, split = indexes
    assert [s.offset for s in split.shards] == [0, 20, 40] and split.n == N
    for info in split.shards:
        shard = split.open_shard(info.number)
        rows = slice(info.offset, info.offset + info.n)
        assert np.array_equal(np.asarray(shard.vectors).view(np.uint16),
                              np.asarray(index.vectors[rows]).view(np.uint16))
        assert shard.ids == index.ids[rows] and shard.metadata == index.metadata[rows]
        assert shard.quantizer_manifest()["centroids_sha256"] == (
            index.quantizer_manifest()["centroids_sha256"])
        assert IVFPartition.load(shard).n == info.n  # its own partition, saved and current
    info = split.info()
    assert info["sharded"] and info["nlist"] == NLIST and not info["has_ledger"]


def test_shard_refuses_bad_input_and_writes_nothing(indexes, tmp_path):
    index, _ = indexes
    with pytest.raises(InvalidParameterError):
        shard_index(index.path, tmp_path / "a", 0)
    with pytest.raises(InvalidParameterError):
        shard_index(index.path, tmp_path / "a", N + 1)
    (tmp_path / "b").mkdir()
    with pytest.raises(EmbeddingIndexError, match="already exists"):
        shard_index(index.path, tmp_path / "b", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_tampered_manifest_or_shard_is_refused(indexes, tmp_path):
    index, _ = indexes
    split = shard_index(index.path, tmp_path / "s", 2)
    manifest = json.loads((split.path / SHARDS_MANIFEST_FILE).read_text())
    manifest["shards"][1]["offset"] = 31
    (split.path / SHARDS_MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(EmbeddingIndexError, match="offset"):
        ShardedIndex.open(split.path)
    other = shard_index(index.path, tmp_path / "t", 2)
    (other.path / "shard-0001" / "quantizer.json").unlink()
    with pytest.raises(EmbeddingIndexError, match="quantizer"):
        ShardedIndex.open(other.path)


# ---- equivalence with the single-node mechanism ----------------------------------------------

@pytest.mark.parametrize("strategy", ["subsample", "probed"])
def test_at_q_one_the_sharded_aggregate_is_the_single_node_one_exactly(indexes, strategy):
    index, split = indexes
    batch = np.concatenate([queries(40), normalise_queries(
        np.asarray(index.vectors[5:6], np.float32), DIM)])  # a query whose best rows tie
    expected = single(index, strategy)._aggregate(batch)
    mechanism = sharded(split, strategy)
    assert np.array_equal(mechanism._aggregate(batch), expected)
    rows = mechanism._neighbour_rows(batch[-1:])[0]
    assert rows[:3].tolist() == [5, 25, 45]  # equal scores across shards: by global row
    # same aggregate + the same noise draws (a seeded research source for both) = same release
    releases = []
    for make, target in ((single, index), (sharded, split)):
        mechanism = make(target, strategy, sigma=1.0, randomness=np.random.default_rng(5))
        releases.append(mechanism.release(batch))
    assert releases[0].dtype == np.float64 and np.array_equal(releases[0], releases[1])


@pytest.mark.parametrize("strategy", ["subsample", "probed"])
def test_at_q_below_one_neighbour_sets_follow_the_naive_mask(indexes, strategy):
    index, split = indexes
    k, q, trials = 2, 0.3, 8_000
    query = queries(1, seed=7)
    # the single index's candidate set, in canonical order (score desc, ties by row)
    if strategy == "probed":
        candidates = np.sort(IVFPartition.open(index, nprobe=NPROBE).candidate_rows(query)[0])
    else:
        candidates = np.arange(N)
    scores = canonical_scores(query[0], np.asarray(index.vectors[candidates], np.float32))
    ordered = candidates[np.lexsort((candidates, -scores))]
    # naive: one Bernoulli(q) coin per candidate, the first k kept down the canonical order
    rng = np.random.default_rng(11)
    kept = rng.random((trials, ordered.size)) < q
    rank = {row: r for r, row in enumerate(ordered.tolist())}

    def key(rows):  # the neighbours' canonical ranks, those past 4 lumped together
        return tuple(min(rank[row], 4) for row in rows)

    naive = [key(ordered[row][:k].tolist()) for row in kept]
    got_rows = sharded(split, strategy, q=q, k=k)._neighbour_rows(np.repeat(query, trials, 0))
    got = [key(rows.tolist()) for rows in got_rows]
    keys = sorted(set(naive) | set(got))
    index_of = {key: i for i, key in enumerate(keys)}
    p_naive = np.bincount([index_of[s] for s in naive], minlength=len(keys)) / trials
    p_got = np.bincount([index_of[s] for s in got], minlength=len(keys)) / trials
    assert 0.5 * np.abs(p_naive - p_got).sum() < 0.045  # TV: ~0.02 expected from sampling
    # and the first neighbour's law is exact: P(rank r first) = q (1 - q)^r
    first = np.array([rank[int(rows[0])] if rows.size else -1 for rows in got_rows])
    for r in range(4):
        assert abs(np.mean(first == r) - q * (1 - q) ** r) < 0.025  # 5 sd


def test_the_non_private_reference_over_shards_is_the_single_node_neighbour_mean(indexes):
    from dprdm.rdm import neighbour_mean, sharded_neighbour_mean

    index, split = indexes
    text = queries(32, seed=7)
    for k in (1, 4, 25):  # 25: more than a shard holds
        assert np.array_equal(sharded_neighbour_mean(LocalShards(split), text, k),
                              neighbour_mean(index, text, k))


# ---- refusals and faults ------------------------------------------------------------------------

def test_bad_strategy_or_nprobe_is_refused_before_anything_is_charged(indexes, tmp_path):
    index, split = indexes
    with pytest.raises(InvalidParameterError):
        sharded(split, "ranked")
    with pytest.raises(InvalidParameterError, match="nprobe"):
        ShardedPrivateRetrieval(LocalShards(split), MechanismParams(1.0, 0.5, 3),
                                InMemoryLedger(**BIG), strategy="probed", nprobe=NLIST + 1)
    plain = build_index(np.eye(4, dtype=np.float32), tmp_path / "plain")
    no_quantizer = shard_index(plain.path, tmp_path / "plain2", 2)
    with pytest.raises(InvalidParameterError, match="quantizer"):
        sharded(no_quantizer, "probed")


class FailingShards:
    """A backend whose second shard answers with rows it does not own (or nothing at all)."""

    def __init__(self, split, mode):
        self._inner = LocalShards(split)
        self.n, self.dim, self.nlist, self.offsets = (self._inner.n, self._inner.dim,
                                                      self._inner.nlist, self._inner.offsets)
        self.mode = mode

    def neighbours(self, queries, params, strategy, nprobe):
        answers = self._inner.neighbours(queries, params, strategy, nprobe)
        if self.mode == "missing":
            return answers[:-1]
        if self.mode == "foreign":
            answers[1] = [(rows - 20, vectors) for rows, vectors in answers[1]]
            return answers
        raise ShardUnavailableError("shard 1 timed out; nothing was released")


@pytest.mark.parametrize("mode", ["missing", "foreign", "raises"])
def test_a_failing_shard_releases_nothing_and_the_charge_stands(indexes, mode):
    _, split = indexes
    ledger = InMemoryLedger(**BIG)
    mechanism = sharded(split, "subsample", ledger=ledger, backend=FailingShards(split, mode))
    with pytest.raises(ShardUnavailableError) as error:
        mechanism.release(queries(3))
    assert error.value.code == "shard_unavailable" and "released" in str(error.value)
    assert ledger.summary().queries == 3  # charged before the shards were asked


def test_a_sharded_index_works_with_the_single_node_cli(indexes, tmp_path):
    from typer.testing import CliRunner

    from dprdm.cli import app

    index, _ = indexes
    runner = CliRunner()
    out = tmp_path / "cli"
    result = runner.invoke(app, ["index", "shard", str(index.path), "--shards", "2", "--out",
                                 str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["budget", "init", str(out), "--epsilon", "5", "--delta",
                               "1e-4", "--k", "3", "--q", "0.5", "--sigma", "1",
                               "--json"]).exit_code == 0
    np.save(tmp_path / "q.npy", queries(3))
    for strategy in ("subsample", "ivf-subsample"):
        result = runner.invoke(app, ["retrieve", str(out), "--query-emb", str(tmp_path / "q.npy"),
                                     "--strategy", strategy, "--nprobe", "2", "--out",
                                     str(tmp_path / f"{strategy}.npy"), "--json"])
        assert result.exit_code == 0, result.output
        assert np.load(tmp_path / f"{strategy}.npy").shape == (3, DIM)
    info = json.loads(runner.invoke(app, ["index", "info", str(out), "--json"]).output)
    assert info["sharded"] and info["has_ledger"] and [s["n"] for s in info["shards"]] == [30, 30]
    refused = runner.invoke(app, ["retrieve", str(out), "--query-emb", str(tmp_path / "q.npy"),
                                  "--strategy", "exact", "--out", str(tmp_path / "x.npy"),
                                  "--json"])
    assert refused.exit_code == 2 and not (tmp_path / "x.npy").exists()
    plain_index = build_index(np.asarray(index.vectors, np.float32), tmp_path / "plain").path
    assert runner.invoke(app, ["budget", "init", str(plain_index), "--epsilon", "5", "--delta",
                               "1e-4", "--k", "3", "--q", "0.5", "--sigma", "1",
                               "--json"]).exit_code == 0
    plain = runner.invoke(app, ["retrieve", str(plain_index), "--query-emb",
                                str(tmp_path / "q.npy"), "--ray-address", "local", "--out",
                                str(tmp_path / "y.npy"), "--json"])
    assert plain.exit_code == 2 and "sharded" in plain.output
    shown = json.loads(runner.invoke(app, ["budget", "show", str(out), "--json"]).output)
    assert shown["queries"] == 6  # two accepted calls of 3; the refused ones charged nothing
    plain_shown = json.loads(runner.invoke(app, ["budget", "show", str(plain_index),
                                                 "--json"]).output)
    assert plain_shown["queries"] == 0


# ---- the ledger binding ----------------------------------------------------------------------

def test_a_sharded_index_is_bound_to_its_ledger_and_a_tampered_shard_is_refused(indexes,
                                                                                 tmp_path):
    import hashlib

    from typer.testing import CliRunner

    from dprdm.cli import app
    from dprdm.errors import LedgerBindingError
    from dprdm.privacy import init_budget, open_private_index
    from dprdm.privacy.binding import binding_of, verify_index

    index, _ = indexes
    split = shard_index(index.path, tmp_path / "bound", 3)
    _, ledger = init_budget(split.path, 5.0, 1e-4, MechanismParams(1.0, 0.5, 3))
    assert (split.path / "ledger.sqlite").is_file()  # the ONE ledger, in the top directory
    files = binding_of(split.path)["embeddings"]["files"]
    assert [f["path"] for f in files] == [f"shard-000{i}/embeddings.npy" for i in range(3)]
    shard_hashes = [hashlib.sha256((s.path / "embeddings.npy").read_bytes()).digest()
                    for s in split.shards]
    assert ledger.embeddings_sha256 == hashlib.sha256(b"".join(shard_hashes)).hexdigest()
    opened, _ = open_private_index(split.path)
    assert isinstance(opened, ShardedIndex)
    assert [f["sha256"] for f in verify_index(split.path)["files"]] == ["ok"] * 3
    with pytest.raises(LedgerBindingError):  # a shard never gets a budget of its own
        init_budget(split.shards[1].path, 5.0, 1e-4, MechanismParams(1.0, 0.5, 3))

    path = split.shards[1].path / "embeddings.npy"  # same size, one sampled block changed
    data = bytearray(path.read_bytes())
    data[-2:] = bytes([data[-2] ^ 0xFF, data[-1] ^ 0xFF])
    path.write_bytes(bytes(data))
    with pytest.raises(LedgerBindingError, match="shard-0001"):
        open_private_index(split.path)
    np.save(tmp_path / "q.npy", queries(2))
    runner = CliRunner()
    for command in (["retrieve", str(split.path), "--query-emb", str(tmp_path / "q.npy"),
                     "--out", str(tmp_path / "r.npy")], ["budget", "show", str(split.path)],
                    ["index", "verify", str(split.path)]):
        result = runner.invoke(app, [*command, "--json"])
        assert result.exit_code == 2 and json.loads(result.stdout)["error"] == "ledger_binding"
    assert not (tmp_path / "r.npy").exists() and ledger.summary().queries == 0
