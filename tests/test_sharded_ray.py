"""The sharded mechanism over real Ray actors (an in-process Ray with 2 CPUs, no dashboard).

Exactness against the single node through Ray, the fault path (an actor killed mid-load: the
release fails, nothing is released, the charge stands, Ray restarts the actor and the next release
works), a timeout, the actor's narrow surface, and serve-shards + retrieve --ray-address auto.
"""

import json
import os
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="ray is a dev dependency (pip install -e '.[dev]')")

from dprdm.privacy import InMemoryLedger, MechanismParams, PrivateRetrieval  # noqa: E402
from dprdm.privacy.mechanism import normalise_queries  # noqa: E402
from dprdm.privacy.sharded import ShardedPrivateRetrieval, ShardUnavailableError  # noqa: E402
from dprdm.retrieval import IVFPartition, build_index, train_public_quantizer  # noqa: E402
from dprdm.retrieval.shards import shard_index  # noqa: E402

N, DIM, SHARDS = 3000, 16, 2
BIG = dict(epsilon=1e6, delta=1e-5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from dprdm.privacy import sharded_ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             namespace=sharded_ray.NAMESPACE,
             resources={sharded_ray.resource_name(i): 1 for i in range(SHARDS)})
    root = tmp_path_factory.mktemp("ray")
    rng = np.random.default_rng(0)
    index = build_index(rng.standard_normal((N, DIM)), root / "idx", dtype="float16")
    quantizer = train_public_quantizer(rng.standard_normal((400, DIM)), 8, None)
    quantizer.save(index.path)
    IVFPartition(index, quantizer).save()
    split = shard_index(index.path, root / "sharded", SHARDS)
    shards = sharded_ray.RayShards.start(split, timeout_s=60)
    yield index, split, shards
    ray.shutdown()


def queries(count, seed=1):
    return normalise_queries(np.random.default_rng(seed).standard_normal((count, DIM)), DIM)


@pytest.mark.parametrize("strategy", ["subsample", "probed"])
def test_through_ray_the_q_one_aggregate_is_the_single_node_one(cluster, strategy):
    index, _, shards = cluster
    params = MechanismParams(1.0, 1.0, 5)
    searcher = IVFPartition.open(index, nprobe=3) if strategy == "probed" else None
    expected = PrivateRetrieval(index, params, InMemoryLedger(**BIG), strategy=strategy,
                                searcher=searcher)._aggregate(queries(16))
    mechanism = ShardedPrivateRetrieval(shards, params, InMemoryLedger(**BIG), strategy=strategy,
                                        nprobe=3)
    assert np.array_equal(mechanism._aggregate(queries(16)), expected)


def test_a_shard_killed_mid_load_fails_the_release_keeps_the_charge_and_recovers(cluster):
    _, split, shards = cluster
    ledger = InMemoryLedger(**BIG)
    params = MechanismParams(1.0, 1.0, 10)
    mechanism = ShardedPrivateRetrieval(shards, params, ledger)
    mechanism.release(queries(1))  # warm: the ledger's capacity is computed, the actors are up
    batch = queries(500)  # q = 1: about a second of work per shard, so the kill lands mid-call
    outcome = {}

    def load():
        try:
            outcome["released"] = mechanism.release(batch)
        except ShardUnavailableError as error:
            outcome["error"] = error

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(0.1)
    ray.kill(shards.actors[1], no_restart=False)  # Ray restarts it (max_restarts)
    worker.join(120)
    assert "released" not in outcome, "a release over a dead shard must not return"
    assert "shard 1" in str(outcome["error"]) and "nothing was released" in str(outcome["error"])
    assert ledger.summary().queries == 501  # the failed batch stays charged
    deadline = time.monotonic() + 90
    while True:  # the actor comes back (re-opening its shard); then releases work again
        try:
            released = mechanism.release(queries(2))
            break
        except ShardUnavailableError:
            assert time.monotonic() < deadline, "the shard actor did not restart"
            time.sleep(1)
    assert released.shape == (2, DIM)
    assert ledger.summary().queries >= 503


def test_a_late_shard_is_a_timeout_and_nothing_is_released(cluster):
    from dprdm.privacy import sharded_ray

    _, split, shards = cluster
    impatient = sharded_ray.RayShards(split, shards.actors, timeout_s=1e-6)
    ledger = InMemoryLedger(**BIG)
    mechanism = ShardedPrivateRetrieval(impatient, MechanismParams(1.0, 1.0, 10), ledger)
    with pytest.raises(ShardUnavailableError, match="timed out"):
        mechanism.release(queries(64))
    assert ledger.summary().queries == 64


def test_the_shard_actor_exposes_only_describe_and_neighbours():
    from dprdm.privacy.sharded_ray import ShardActor

    methods = {name for name in dir(ShardActor.__ray_actor_class__)
               if not name.startswith("_") and callable(getattr(ShardActor.__ray_actor_class__,
                                                                 name))}
    assert methods == {"describe", "neighbours"}


def test_serve_shards_then_retrieve_with_ray_address_auto(cluster, tmp_path):
    from typer.testing import CliRunner

    from dprdm.cli import app
    from dprdm.privacy import sharded_ray

    _, split, _ = cluster
    runner = CliRunner()
    result = runner.invoke(app, ["index", "serve-shards", str(split.path), "--ray-address",
                                 "auto", "--json"])
    assert result.exit_code == 0, result.output
    started = json.loads(result.output)
    assert started["actors"] == [sharded_ray.actor_name(split, i) for i in range(SHARDS)]
    assert runner.invoke(app, ["budget", "init", str(split.path), "--epsilon", "5", "--delta",
                               "1e-5", "--k", "5", "--q", "0.1", "--sigma", "1",
                               "--json"]).exit_code == 0
    np.save(tmp_path / "q.npy", queries(4))
    result = runner.invoke(app, ["retrieve", str(split.path), "--query-emb",
                                 str(tmp_path / "q.npy"), "--strategy", "ivf-subsample",
                                 "--ray-address", "auto",
                                 "--out", str(tmp_path / "r.npy"), "--json"])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "r.npy").shape == (4, DIM) and json.loads(result.output)[
        "queries"] == 4
    for i in range(SHARDS):
        ray.kill(ray.get_actor(sharded_ray.actor_name(split, i)), no_restart=True)
