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


def test_a_late_shard_is_a_timeout_and_nothing_is_released(cluster, monkeypatch):
    from dprdm.privacy import sharded_ray

    _, split, shards = cluster
    impatient = sharded_ray.RayShards(split, shards.actors, timeout_s=1e-6)
    ledger = InMemoryLedger(**BIG)
    mechanism = ShardedPrivateRetrieval(impatient, MechanismParams(1.0, 1.0, 10), ledger)
    with pytest.raises(ShardUnavailableError, match="timed out"):
        mechanism.release(queries(64))
    assert ledger.summary().queries == 64
    # Starting (the actors' check of their shard files) waits START_TIMEOUT_S, not the release
    # timeout: a worker process's start alone can take a minute on a loaded machine.
    impatient._check(split)
    monkeypatch.setattr(sharded_ray, "START_TIMEOUT_S", 1e-6)
    with pytest.raises(ShardUnavailableError, match="while starting.*nothing was charged"):
        impatient._check(split)


class _FakeMethod:
    def __init__(self, calls, number):
        self.calls, self.number = calls, number

    def remote(self):
        self.calls.append(self.number)
        return (self.number, self.calls.count(self.number))  # (shard, attempt) stands for a ref


class _FakeActor:
    def __init__(self, calls, number):
        self.describe = _FakeMethod(calls, number)


def _facts(split):
    return [{"verified": "sampled", "offset": info.offset, "n": info.n,
             "embeddings_sha256": info.embeddings_sha256} for info in split.shards]


def _flaky_ray(monkeypatch, split, unavailable_for):
    """ray.get answering ActorUnavailableError to shard 0's first `unavailable_for` calls."""
    from ray.exceptions import ActorUnavailableError

    from dprdm.privacy import sharded_ray

    facts = _facts(split)

    def get(ref, timeout=None):
        shard, attempt = ref
        if shard == 0 and attempt <= unavailable_for:
            raise ActorUnavailableError("busy", None)
        return facts[shard]

    monkeypatch.setattr(sharded_ray.ray, "get", get)
    monkeypatch.setattr(sharded_ray.ray, "cancel", lambda ref: None)
    return sharded_ray


@pytest.mark.parametrize("unavailable_for", [1, 3])
def test_starting_asks_a_temporarily_unavailable_actor_again(cluster, monkeypatch,
                                                              unavailable_for):
    """Ray's ActorUnavailableError (restarting, or too busy for the RPC) is transient: start and
    connect ask that actor again until START_TIMEOUT_S."""
    _, split, _ = cluster
    sharded_ray = _flaky_ray(monkeypatch, split, unavailable_for)
    monkeypatch.setattr(sharded_ray, "UNAVAILABLE_PAUSE_S", 0.01)
    calls: list[int] = []
    sharded_ray.RayShards(split, [_FakeActor(calls, i) for i in range(SHARDS)])._check(split)
    assert calls.count(0) == unavailable_for + 1 and calls.count(1) == 1


def test_an_actor_unavailable_past_the_start_deadline_or_in_a_release_is_an_error(cluster,
                                                                                  monkeypatch):
    _, split, _ = cluster
    sharded_ray = _flaky_ray(monkeypatch, split, unavailable_for=100)
    monkeypatch.setattr(sharded_ray, "START_TIMEOUT_S", 0.05)
    monkeypatch.setattr(sharded_ray, "UNAVAILABLE_PAUSE_S", 0.02)
    calls: list[int] = []
    shards = sharded_ray.RayShards(split, [_FakeActor(calls, i) for i in range(SHARDS)],
                                   timeout_s=0.05)
    with pytest.raises(ShardUnavailableError, match=r"shard 0 failed \(ActorUnavailableError\) "
                       "while starting.*nothing was charged"):
        shards._check(split)
    assert 2 <= calls.count(0) <= 3  # asked again until the deadline, then no more
    with pytest.raises(ShardUnavailableError, match="shard 0 failed.*nothing was released"):
        shards._gather([(0, 1), (1, 1)])  # a release is never retried


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


def _bound_sharded_index(root, n=300, dim=DIM, shards=SHARDS, ids_prefix="record-"):
    """A float16 index split into `shards` shards, with a ledger bound to the sharded copy."""
    from dprdm.privacy import init_budget

    vectors = np.random.default_rng(3).standard_normal((n, dim))
    build_index(vectors, root / "plain", dtype="float16",
                ids=[f"{ids_prefix}{i:04d}" for i in range(n)])
    split = shard_index(root / "plain", root / "sharded", shards)
    init_budget(split.path, 2.0, 1e-5, MechanismParams(2.0, 0.5, 5), 0.8)
    return split


def test_a_tampered_shard_file_on_a_node_is_refused_at_actor_start_and_nothing_is_charged(
        cluster, tmp_path):
    from dprdm.errors import LedgerBindingError
    from dprdm.privacy import open_private_index
    from dprdm.privacy.sharded import shard_backend

    split = _bound_sharded_index(tmp_path)
    # the coordinator opens and verifies ITS copy; the node's copy is then altered (the same
    # path stands in for a shard file on another machine): one byte, size and mtime kept
    index, ledger = open_private_index(split.path)
    path = split.shards[1].path / "embeddings.npy"
    original, stat = path.read_bytes(), os.stat(path)
    tampered = bytearray(original)
    tampered[-7] ^= 0x40
    path.write_bytes(bytes(tampered))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(LedgerBindingError, match="shard 1 refuses to serve it") as refused:
        shard_backend(index, "local")
    assert "sampled blocks differ" in str(refused.value)
    assert ledger.summary().queries == 0  # refused before any charge
    # the same bytes under a new mtime: the full SHA-256 is recomputed, matches, and it serves
    path.write_bytes(original)
    shards = shard_backend(index, "local")
    facts = ray.get([actor.describe.remote() for actor in shards.actors])
    assert [fact["verified"] for fact in facts] == ["sampled", "full"]
    mechanism = ShardedPrivateRetrieval(shards, ledger.mechanism, ledger)
    assert mechanism.release(queries(2)).shape == (2, DIM) and ledger.summary().queries == 2
    # before `budget init` there is no sampled fingerprint: the full SHA-256 of shards.json
    unbound = shard_index(tmp_path / "plain", tmp_path / "unbound", SHARDS)
    path = unbound.shards[0].path / "embeddings.npy"
    path.write_bytes(path.read_bytes()[:-2] + b"\0\0")
    with pytest.raises(LedgerBindingError, match="shard 0 refuses.*SHA-256 differs"):
        shard_backend(unbound, "local")


def test_serve_with_ray_shards_answers_dp_requests_and_a_killed_actor_is_a_503(
        cluster, tmp_path):
    from fastapi.testclient import TestClient

    from _service_support import DIM as SERVICE_DIM
    from _service_support import SETTINGS, free_port, models
    from dprdm.privacy import SqliteLedger
    from dprdm.service.app import create_app
    from dprdm.service.config import build_config
    from dprdm.service.engine import GenerationEngine
    from dprdm.service.keys import KeyStore

    split = _bound_sharded_index(tmp_path, dim=SERVICE_DIM, ids_prefix="private-record-")
    ledger = SqliteLedger(split.path)
    port = free_port()
    config = build_config({"index_dir": split.path, "ray_address": "local", "port": port,
                           "default_steps": 2})
    assert config.ray_address == "local" and config.settings == SETTINGS
    encoder, pipeline = models()
    engine = GenerationEngine(config, encoder=encoder, pipeline=pipeline)
    actors = engine.rag.mechanism._shards.actors  # the service's shards are Ray actors
    assert len(actors) == SHARDS
    client = TestClient(create_app(config, engine=engine), base_url=f"http://127.0.0.1:{port}")
    token, _ = KeyStore(split.path).create("alice")

    def generate():
        return client.post("/v1/generate", json={"prompt": "red apple", "n": 1, "steps": 2},
                           headers={"Authorization": f"Bearer {token}"})

    response = generate()
    assert response.status_code == 200, response.text
    assert response.json()["queries_spent"] == ledger.summary().queries == 1
    assert "private-record-" not in response.text
    # an actor killed and restarted by Ray: every request is charged; each answer is a 200 or a
    # 503 shard_unavailable with Retry-After, never a partial release; it serves again
    ray.kill(actors[0], no_restart=False)
    sent, deadline = 1, time.monotonic() + 90
    while True:
        response, sent = generate(), sent + 1
        if response.status_code == 200:
            break
        assert response.status_code == 503 and response.json()["error"] == "shard_unavailable"
        assert time.monotonic() < deadline, "the shard actor did not come back"
        time.sleep(0.5)
    assert ledger.summary().queries == sent
    # an actor that stays dead: 503 with Retry-After, no images, the charge stands
    ray.kill(actors[1], no_restart=True)
    response = generate()
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "5"
    body = response.json()
    assert body["error"] == "shard_unavailable" and "shard 1" in body["message"]
    assert "images" not in body and "private-record-" not in response.text
    assert ledger.summary().queries == sent + 1


def test_eval_runs_on_a_sharded_index_through_ray(cluster, tmp_path):
    from typer.testing import CliRunner

    from dprdm.cli import app
    from dprdm.encoders import load_encoder
    from dprdm.privacy import SqliteLedger, init_budget

    encoder = load_encoder("demo")
    images = np.random.default_rng(0).integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    build_index(encoder.encode_images(images), tmp_path / "plain")
    split = shard_index(tmp_path / "plain", tmp_path / "sharded", SHARDS)
    init_budget(split.path, 3.0, 1e-6, MechanismParams(sigma=0.5, q=0.5, k=4), lam=0.7)
    holdout = tmp_path / "holdout"
    holdout.mkdir()
    from PIL import Image

    with (holdout / "captions.jsonl").open("w") as f:
        for i, caption in enumerate(["grinning face", "red apple", "cat face", "house",
                                     "rocket", "sun", "red heart", "ghost"]):
            Image.fromarray(images[i]).save(holdout / f"{i}.png")
            f.write(json.dumps({"file": f"{i}.png", "caption": caption}) + "\n")
    result = CliRunner().invoke(app, [
        "eval", "--index", str(split.path), "--holdout", str(holdout), "--out",
        str(tmp_path / "report"), "--epsilons", "8", "--queries", "100", "--steps", "2",
        "--guidance", "1", "--ray-address", "local", "--json"])
    assert result.exit_code == 0, result.output
    runs = json.loads(result.stdout)["runs"]
    assert [r["setting"] for r in runs] == ["public-only", "dp", "non-private"]
    assert runs[1]["queries_charged"] == 8 and runs[1]["private"] is True
    assert all(np.isfinite(r["fid"]) for r in runs)
    assert SqliteLedger(split.path).summary().queries == 0  # experiments: in-memory ledgers
