"""Shard actors on Ray Core -- the ONE dprdm module that imports ray (nothing imports it at top
level; :func:`dprdm.privacy.sharded.shard_backend` loads it on demand).

* :class:`ShardActor` wraps :class:`~dprdm.privacy.sharded.ShardNeighbours`: it memory-maps one
  shard index, after checking the shard's embeddings file ON ITS NODE against the fingerprint in
  the sharded manifest (size, sampled blocks, full SHA-256 when the mtime differs; a mismatch
  leaves it refusing, and ``start`` / ``connect`` raise naming the shard, before anything is
  charged), and has exactly two methods, ``describe`` (public facts: offset, n, dim, SHA-256)
  and ``neighbours`` (the local top-k rows and vectors for the coordinator). No other method
  returns vectors. Ray restarts a dead actor (``max_restarts``); a call in flight when it dies is
  NOT retried (``max_task_retries=0``): the release fails, see below.
* :class:`RayShards` is the coordinator's handle on the S actors: ``start`` creates them (in an
  in-process Ray, or detached and named on a cluster for ``dprdm index serve-shards``),
  ``connect`` finds the named actors on a cluster and checks that they serve this index (both
  wait up to START_TIMEOUT_S for the actors to come up, asking again an actor that Ray reports
  as temporarily unavailable).
  ``neighbours`` asks all S actors at once and waits at most ``timeout_s``; a dead, restarting,
  failed or late actor raises :class:`~dprdm.privacy.sharded.ShardUnavailableError` -- never a
  partial answer.

SECURITY: Ray's own authentication is at most a shared cluster token (RAY_AUTH_MODE=token in
recent Ray; none in older ones, CVE-2023-48022 "ShadowRay"). Anyone who can reach the cluster's
ports (or holds its token) can call ``neighbours`` on a shard actor and read raw private vectors,
bypassing the ledger. The Ray network must be private to the operator: see docs/scaling.md.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import ray
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayError

from dprdm.errors import (DprdmError, EmbeddingIndexError, InvalidParameterError,
                          LedgerBindingError)
from dprdm.privacy.accounting import MechanismParams
from dprdm.privacy.sharded import ShardAnswer, ShardNeighbours, ShardUnavailableError

NAMESPACE = "dprdm"
MAX_RESTARTS = 10
# How long start/connect wait for every actor to come up and check its shard file (a new worker
# process, dprdm's imports, the fingerprint -- a full SHA-256 where the mtime differs): longer
# than a release's timeout (on a 2-core machine with a training job beside it, 57 s).
START_TIMEOUT_S = 300.0
# While starting, an actor Ray reports as temporarily unavailable (restarting, or too busy to take
# the call) is asked again after this pause, until START_TIMEOUT_S.
UNAVAILABLE_PAUSE_S = 0.5
# why an actor refused to open its shard, as the coordinator raises it
REFUSALS = {"LedgerBindingError": LedgerBindingError, "EmbeddingIndexError": EmbeddingIndexError}


def init_ray(address: str, *, num_cpus: int | None = None,
             resources: dict[str, float] | None = None) -> None:
    """Join the Ray cluster at `address` ("auto", "ray://host:port", "host:port"), or start an
    in-process one for ``"local"``; a no-op when this process is already connected."""
    if not isinstance(address, str) or not address.strip():
        raise InvalidParameterError("--ray-address must be 'local', 'auto' or a cluster address")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return
    try:
        if address == "local":  # no dashboard: nothing listens beyond what Ray itself needs
            ray.init(num_cpus=num_cpus, resources=resources, include_dashboard=False,
                     namespace=NAMESPACE, log_to_driver=False)
        else:
            ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise DprdmError(f"cannot join the Ray cluster at {address!r}: {error}") from None


def actor_name(sharded: Any, number: int) -> str:
    """The name of shard `number`'s actor: bound to the index's content, so two indexes (or a
    rebuilt one) never share actors."""
    return f"dprdm-shard-{sharded.source_sha256[:16]}-{number:04d}"


def resource_name(number: int) -> str:
    """The custom resource that pins shard `number`'s actor to the node(s) offering it."""
    return f"dprdm_shard_{number}"


@ray.remote
class ShardActor:
    """One shard, memory-mapped in a Ray worker; only ``neighbours`` returns vectors."""

    def __init__(self, shard_dir: str, offset: int, embeddings_sha256: str,
                 fingerprint: dict[str, Any] | None = None, full_hash: bool = False) -> None:
        # The shard file on THIS node is checked against the manifest's fingerprint; a mismatch
        # (or a missing shard) leaves the actor up but refusing, so that `describe` can tell the
        # coordinator why (a raising constructor would only surface as "actor died").
        self._shard: ShardNeighbours | None = None
        self._refusal: dict[str, str] | None = None
        try:
            self._shard = ShardNeighbours(shard_dir, offset, embeddings_sha256, fingerprint,
                                          full_hash=full_hash)
        except DprdmError as error:  # messages name the file and the check: public facts
            self._refusal = {"error": type(error).__name__, "message": str(error)}

    def describe(self) -> dict[str, Any]:
        if self._shard is None:
            return {"refused": self._refusal}
        return self._shard.describe()

    def neighbours(self, queries: np.ndarray, params: MechanismParams, strategy: str,
                   nprobe: int) -> ShardAnswer:
        if self._shard is None:
            raise DprdmError("this shard actor refused to open its shard; see describe()")
        return self._shard.neighbours(queries, params, strategy, nprobe)  # type: ignore[arg-type]


class RayShards:
    """The coordinator's view of the S shard actors (a ShardBackend)."""

    def __init__(self, sharded: Any, actors: list[Any], *, timeout_s: float = 60.0) -> None:
        if not timeout_s > 0:
            raise InvalidParameterError(f"the shard timeout must be positive, got {timeout_s!r}")
        self.n, self.dim, self.nlist = sharded.n, sharded.dim, sharded.nlist
        self.offsets = [s.offset for s in sharded.shards] + [sharded.n]
        self.actors = actors
        self.timeout_s = float(timeout_s)

    @classmethod
    def start(cls, sharded: Any, *, detached: bool = False, use_resources: bool = False,
              max_restarts: int = MAX_RESTARTS, num_cpus: float = 0,
              timeout_s: float = 60.0, full_hash: bool = False) -> RayShards:
        """Create one actor per shard and wait until each has opened its shard and checked its
        file against the manifest's fingerprint (:func:`~dprdm.privacy.binding.shard_fingerprints`;
        `full_hash`: the full SHA-256 even when the file's mtime matches).

        `detached`: named actors that outlive this process (``serve-shards``); `use_resources`:
        each needs one unit of ``dprdm_shard_<i>`` (start nodes with ``ray start --resources``)."""
        from dprdm.privacy.binding import shard_fingerprints

        fingerprints = shard_fingerprints(sharded)
        actors = []
        for info, fingerprint in zip(sharded.shards, fingerprints):
            options: dict[str, Any] = {"max_restarts": max_restarts, "max_task_retries": 0,
                                       "num_cpus": num_cpus}
            if detached:
                options.update(name=actor_name(sharded, info.number), namespace=NAMESPACE,
                               lifetime="detached", get_if_exists=True)
            if use_resources:
                options["resources"] = {resource_name(info.number): 1}
            actors.append(ShardActor.options(**options).remote(
                str(info.path.resolve()), info.offset, info.embeddings_sha256, fingerprint,
                full_hash))
        shards = cls(sharded, actors, timeout_s=timeout_s)
        try:
            shards._check(sharded)
        except DprdmError:  # a refusing actor must not linger (get_if_exists would reuse it)
            for actor in actors:
                try:
                    ray.kill(actor, no_restart=True)
                except (RayError, ValueError):
                    pass
            raise
        return shards

    @classmethod
    def connect(cls, sharded: Any, *, timeout_s: float = 60.0) -> RayShards:
        """The named actors ``dprdm index serve-shards`` started for this index."""
        actors = []
        for info in sharded.shards:
            try:
                actors.append(ray.get_actor(actor_name(sharded, info.number), namespace=NAMESPACE))
            except ValueError:
                raise DprdmError(
                    f"no actor serves shard {info.number} of {sharded.path} on this Ray cluster; "
                    f"start them with `dprdm index serve-shards {sharded.path} --ray-address ...`"
                ) from None
        shards = cls(sharded, actors, timeout_s=timeout_s)
        shards._check(sharded)
        return shards

    def _check(self, sharded: Any) -> None:
        """Every actor is up (within START_TIMEOUT_S), checked its shard file against the
        manifest's fingerprint, and serves the shard the manifest names (public facts only)."""
        facts = self._describe(timeout_s=max(self.timeout_s, START_TIMEOUT_S))
        for info, fact in zip(sharded.shards, facts):
            if fact.get("refused"):
                error = REFUSALS.get(fact["refused"]["error"], DprdmError)
                raise error(f"the actor for shard {info.number} refuses to serve it: "
                            f"{fact['refused']['message']}")
            if fact.get("verified") not in ("sampled", "full"):
                raise DprdmError(f"the actor for shard {info.number} did not check its shard "
                                 "file (started by an older dprdm?): stop it and start it again")
            if (fact["offset"], fact["n"], fact["embeddings_sha256"]) != (
                    info.offset, info.n, info.embeddings_sha256):
                raise DprdmError(f"the actor for shard {info.number} serves other rows than "
                                 f"{sharded.path}")

    def _describe(self, *, timeout_s: float) -> list[Any]:
        """Every actor's public facts. An actor that Ray reports as temporarily unavailable
        (ActorUnavailableError: restarting, or too busy to take the call) is asked again until
        the deadline; any other failure, or the deadline, raises ShardUnavailableError."""
        deadline = time.monotonic() + timeout_s
        refs = [actor.describe.remote() for actor in self.actors]
        facts = []
        for number, actor in enumerate(self.actors):
            while True:
                try:
                    facts.append(ray.get(refs[number],
                                         timeout=max(0.0, deadline - time.monotonic())))
                    break
                except ActorUnavailableError as error:
                    if time.monotonic() + UNAVAILABLE_PAUSE_S >= deadline:
                        raise self._failed(refs, number, error, starting=True) from None
                    time.sleep(UNAVAILABLE_PAUSE_S)
                    refs[number] = actor.describe.remote()
                except (GetTimeoutError, RayError) as error:
                    raise self._failed(refs, number, error, starting=True) from None
        return facts

    def _gather(self, refs: list[Any]) -> list[Any]:
        """All results within the release timeout, or ShardUnavailableError naming the first
        shard that failed or was late (never a partial answer, never a retry)."""
        deadline = time.monotonic() + self.timeout_s
        results = []
        for number, ref in enumerate(refs):
            try:
                results.append(ray.get(ref, timeout=max(0.0, deadline - time.monotonic())))
            except (GetTimeoutError, RayError) as error:
                raise self._failed(refs, number, error, starting=False) from None
        return results

    @staticmethod
    def _failed(refs: list[Any], number: int, error: Exception, *,
                starting: bool) -> ShardUnavailableError:
        """Drop the calls still queued (best effort) and say which shard failed and how; the
        error's own message is not quoted (it may quote data)."""
        for pending in refs:
            try:
                ray.cancel(pending)
            except (RayError, TypeError, ValueError):
                pass
        reason = ("timed out" if isinstance(error, GetTimeoutError)
                  else f"failed ({type(error).__name__})")
        if starting:
            return ShardUnavailableError(
                f"the actor for shard {number} {reason} while starting (opening and checking its "
                "shard file); nothing was charged")
        return ShardUnavailableError(
            f"shard {number} {reason}; nothing was released and the budget charged for this "
            f"batch stays spent. Ray restarts a dead shard actor; retry in about "
            f"{ShardUnavailableError.retry_after_s} s")

    def neighbours(self, queries: np.ndarray, params: MechanismParams, strategy: str,
                   nprobe: int) -> list[ShardAnswer]:
        shared = ray.put(np.ascontiguousarray(queries))  # one copy for the S actors
        return self._gather([actor.neighbours.remote(shared, params, strategy, nprobe)
                             for actor in self.actors])
