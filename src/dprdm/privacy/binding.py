"""Binding a private index to its ledger, so that file operations cannot re-arm the budget.

Owns the ONE entry point that opens a private index with its ledger, :func:`open_private_index`,
and the one that creates the pair, :func:`init_budget` (``dprdm budget init``).

The BOUND manifest and data of an index: ``index.json`` and ``embeddings.npy`` for a plain index;
``shards.json`` and every shard's ``shard-NNNN/embeddings.npy`` for a sharded one
(:mod:`dprdm.retrieval.shards`), whose ONE ledger lives in its top directory. A shard's own
directory cannot get a ledger of its own.

At ``budget init`` a random 128-bit ledger id and the fingerprints of the bound embeddings files
(hashed in streamed blocks) are written into the bound manifest (key ``"privacy"``, rewritten
atomically), with a history of every ledger the index ever had; the ledger records the id and the
embeddings' SHA-256: the file's SHA-256 for a plain index, the SHA-256 of the shards' raw SHA-256
digests in shard order for a sharded one. :func:`open_private_index` refuses, with nothing charged
and nothing released:

* a missing ledger for an index whose manifest names one (deleted: ``rm ledger.sqlite*``);
* a ledger whose id differs from the manifest's (another index's ledger, or a new one);
* a ledger below its release watermark (a restored backup; see :mod:`dprdm.privacy.ledger`);
* embeddings whose content changed (any shard's, for a sharded index). The check on open is cheap:
  per file its size, a hash of its header and of SAMPLE_BLOCKS blocks at positions fixed by the
  size, and -- only when the modification time differs from the recorded one -- the full SHA-256.
  ``dprdm index verify`` always recomputes every full hash.
* a PostgreSQL ledger (``--ledger postgresql://...``) the same way: the manifest records its URL
  WITHOUT a password (key ``ledger_url``; the password comes from PGPASSWORD, ~/.pgpass or a libpq
  service), the ledger row holds the id and the embeddings hash, and the watermark lives in the
  index directory (each replica's copy of it only grows).

Not detectable here (documented in docs/privacy.md): restoring the ledger AND its watermark
together, or copying the whole directory (both fork the budget); deleting the whole index and
building it again from the same data; a same-size rewrite that keeps the modification time and
misses every sampled block (``index verify`` catches it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dprdm.conditioning import check_lam
from dprdm.errors import DprdmError, InvalidParameterError, LedgerBindingError
from dprdm.files import write_bytes_atomically
from dprdm.privacy import accounting
from dprdm.privacy.accounting import MechanismParams
from dprdm.privacy.ledger import (LEDGER_FILENAME, WATERMARK_FILENAME, StoredLedger,
                                  is_postgres_url)
from dprdm.privacy.ledger_sqlite import SqliteLedger
from dprdm.retrieval.shards import SHARDS_MANIFEST_FILE, ShardedIndex, is_sharded
from dprdm.retrieval.store import (EMBEDDINGS_FILE, MANIFEST_FILE, EmbeddingIndex, ledger_files,
                                   read_json_object)

MANIFEST_KEY = "privacy"
NEW_BUDGET_FLAG = "--new-budget-i-understand-this-voids-the-guarantee"
HASH_BLOCK = 4 * 1024 * 1024
SAMPLE_BLOCK = 64 * 1024
SAMPLE_BLOCKS = 16

Progress = Callable[[int, int], None]
PrivateIndex = EmbeddingIndex | ShardedIndex

VOIDS_THE_GUARANTEE = (
    "A new budget voids the guarantee for every record already queried: the releases made "
    "under the lost ledger are still out there, and the new budget does not count them, so "
    "those records can now be queried again up to the full new budget."
)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- hashing ---------------------------------------------------------------------------------------
def full_sha256(path: Path, progress: Progress | None = None) -> str:
    """SHA-256 of the whole file, read in HASH_BLOCK blocks (`progress(bytes_done, total)`)."""
    digest, total, done = hashlib.sha256(), os.path.getsize(path), 0
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done, total)
    return digest.hexdigest()


def sampled_sha256(path: Path) -> str:
    """SHA-256 of the size, the first block (the .npy header and first rows) and SAMPLE_BLOCKS
    blocks at offsets evenly spread over the file (fixed by the size alone)."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    last = max(0, size - SAMPLE_BLOCK)
    offsets = sorted({0} | {i * last // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)})
    with open(path, "rb") as handle:
        for offset in offsets:
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BLOCK))
    return digest.hexdigest()


def fingerprint(path: Path, progress: Progress | None = None) -> dict[str, Any]:
    """What the manifest records about the embeddings file: size, mtime, full and sampled hash."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "sha256": full_sha256(path, progress), "sampled_sha256": sampled_sha256(path)}


# -- the bound manifest and files ------------------------------------------------------------------
def _manifest_path(index_dir: Path) -> Path:
    return Path(index_dir) / (SHARDS_MANIFEST_FILE if is_sharded(index_dir) else MANIFEST_FILE)


def _refuse_shard(index_dir: Path) -> None:
    """A shard's directory is part of the sharded index above it, whose ledger is its budget."""
    parent = Path(index_dir).resolve().parent
    if is_sharded(parent) and Path(index_dir).resolve().name in {
            s.path.name for s in ShardedIndex.open(parent, check_shards=False).shards}:
        raise LedgerBindingError(
            f"{index_dir} is a shard of the sharded index {parent}: its records are under that "
            f"index's ledger. Use {parent} (a shard never gets a budget of its own)."
        )


def _open_index(index_dir: Path) -> tuple[PrivateIndex, list[str]]:
    """The index at `index_dir` and its bound data files (paths relative to `index_dir`)."""
    _refuse_shard(index_dir)
    if is_sharded(index_dir):
        index = ShardedIndex.open(index_dir)
        return index, [f"{s.path.name}/{EMBEDDINGS_FILE}" for s in index.shards]
    return EmbeddingIndex.open(index_dir), [EMBEDDINGS_FILE]


def embeddings_bytes(index_dir: str | os.PathLike) -> int:
    """Total size of the embeddings files a binding would hash (0 when there is no index)."""
    index_dir = Path(index_dir)
    if is_sharded(index_dir):
        return sum(p.stat().st_size for p in index_dir.glob(f"shard-*/{EMBEDDINGS_FILE}"))
    path = index_dir / EMBEDDINGS_FILE
    return path.stat().st_size if path.is_file() else 0


def read_manifest(index_dir: Path) -> dict[str, Any]:
    return read_json_object(_manifest_path(index_dir))


def binding_of(index_dir: Path) -> dict[str, Any] | None:
    """The bound manifest's privacy section: ledger id, embeddings fingerprints, ledger history."""
    binding = read_manifest(index_dir).get(MANIFEST_KEY)
    return binding if isinstance(binding, dict) and binding.get("ledger_id") else None


def _write_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, ensure_ascii=False, indent=1) + "\n"
    write_bytes_atomically(_manifest_path(index_dir), text.encode())


def _combined_sha256(prints: list[dict[str, Any]]) -> str:
    """A sharded index's embeddings SHA-256: of the shards' raw SHA-256 digests, in shard order."""
    return hashlib.sha256(b"".join(bytes.fromhex(p["sha256"]) for p in prints)).hexdigest()


def _fingerprints(index_dir: Path, files: list[str], sharded: bool,
                  progress: Progress | None) -> dict[str, Any]:
    """The manifest's "embeddings" entry: the file's fingerprint (plain), or the combined SHA-256
    and {"path", fingerprint...} per shard file (sharded). `progress` counts all files' bytes."""
    total, done, prints = sum(os.path.getsize(index_dir / name) for name in files), 0, []
    for name in files:
        step = None if progress is None else (lambda d, _t, base=done: progress(base + d, total))
        prints.append(dict(fingerprint(index_dir / name, step), path=name))
        done += prints[-1]["size"]
    if not sharded:
        return {key: value for key, value in prints[0].items() if key != "path"}
    return {"sha256": _combined_sha256(prints), "files": prints}


def _bound_files(binding: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """[(path relative to the index, its recorded fingerprint)] -- the manifest's own dicts."""
    embeddings = binding["embeddings"]
    if "files" in embeddings:
        return [(entry["path"], entry) for entry in embeddings["files"]]
    return [(EMBEDDINGS_FILE, embeddings)]


def _changed(path: Path, what: str) -> LedgerBindingError:
    return LedgerBindingError(
        f"{path} changed since its ledger was created ({what}): the budget was spent on the "
        "records it held then. Refused: nothing is charged or released. Restore the original "
        "embeddings, or build a new index (a new data set) in another directory."
    )


def _verify_file(path: Path, expected: dict[str, Any], full: bool,
                 progress: Progress | None) -> dict[str, Any]:
    """Check one embeddings file against its recorded fingerprint; raise if it changed."""
    stat = os.stat(path)
    if stat.st_size != expected["size"]:
        raise _changed(path, f"size {stat.st_size} bytes, recorded {expected['size']}")
    if sampled_sha256(path) != expected["sampled_sha256"]:
        raise _changed(path, "sampled blocks differ")
    result = {"size": stat.st_size, "sampled_sha256": "ok", "sha256": "not recomputed"}
    if full or stat.st_mtime_ns != expected["mtime_ns"]:
        if full_sha256(path, progress) != expected["sha256"]:
            raise _changed(path, "SHA-256 differs")
        result["sha256"] = "ok"
    return result


def verify_embeddings(index_dir: Path, binding: dict[str, Any], files: list[str], *,
                      full: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """Check every bound embeddings file (`files`: the index's, as :func:`_open_index` lists
    them) against the recorded fingerprints; raise if any changed. The result of a plain index
    is its file's; a sharded index's has one per file under "files"."""
    bound = _bound_files(binding)
    if [name for name, _ in bound] != files or (
            "files" in binding["embeddings"]
            and _combined_sha256([e for _, e in bound]) != binding["embeddings"]["sha256"]):
        raise _changed(Path(index_dir), "its embeddings files are not the ones bound to the ledger")
    results = [dict(_verify_file(Path(index_dir) / name, expected, full, progress), path=name)
               for name, expected in bound]
    if "files" not in binding["embeddings"]:
        return {key: value for key, value in results[0].items() if key != "path"}
    return {"files": results}


def shard_fingerprints(sharded: ShardedIndex) -> list[dict[str, Any]]:
    """Per shard, what its embeddings file must match before a shard actor serves it (on a node
    whose copy the coordinator never hashed): the fingerprint the ledger binding recorded in
    ``shards.json`` (size, mtime, sampled and full SHA-256), or, before ``budget init``, the full
    SHA-256 that ``index shard`` recorded there (then recomputed in full)."""
    binding = binding_of(sharded.path)
    recorded = dict(_bound_files(binding)) if binding is not None else {}
    prints = []
    for info in sharded.shards:
        entry = recorded.get(f"{info.path.name}/{EMBEDDINGS_FILE}")
        if entry is None:
            prints.append({"sha256": info.embeddings_sha256})
            continue
        if entry["sha256"] != info.embeddings_sha256:
            raise _changed(info.path / EMBEDDINGS_FILE, f"its ledger binding and "
                           f"{SHARDS_MANIFEST_FILE} record different SHA-256s")
        prints.append({key: entry[key] for key in ("size", "mtime_ns", "sha256",
                                                   "sampled_sha256")})
    return prints


def check_shard_file(path: Path, expected: dict[str, Any], *, full: bool = False) -> str:
    """Raise LedgerBindingError unless the embeddings file at `path` matches `expected` (one
    entry of :func:`shard_fingerprints`); return what was hashed: "sampled" (size and sampled
    blocks, the full SHA-256 only when the mtime differs, as on open) or "full"."""
    if "sampled_sha256" not in expected:  # no binding yet: only the full hash is recorded
        if full_sha256(path) != expected["sha256"]:
            raise LedgerBindingError(
                f"{path} does not match {SHARDS_MANIFEST_FILE} (SHA-256 differs): refused, this "
                "shard is not served. Copy the shard again from the coordinator's index.")
        return "full"
    result = _verify_file(path, expected, full, None)
    return "full" if result["sha256"] == "ok" else "sampled"


# -- the two entry points --------------------------------------------------------------------------
def _ledger_location(index_dir: Path, binding: dict[str, Any] | None,
                     ledger: str | None) -> str | None:
    """The PostgreSQL URL to open (the caller's --ledger, else the manifest's), or None for the
    SQLite file in the index directory."""
    if ledger is not None:
        if not is_postgres_url(ledger):
            raise InvalidParameterError("--ledger takes a postgresql:// URL (the default is the "
                                        "SQLite ledger in the index directory)")
        if binding is not None and not binding.get("ledger_url"):
            raise LedgerBindingError(
                f"{index_dir} is bound to its SQLite ledger ({LEDGER_FILENAME}), not to a "
                "PostgreSQL ledger: drop --ledger. Refused: nothing is charged or released.")
        return ledger
    return binding.get("ledger_url") if binding is not None else None


def open_private_index(index_dir: str | os.PathLike, ledger: str | None = None, *,
                       read_only: bool = False) -> tuple[PrivateIndex, StoredLedger]:
    """Open a private index (plain or sharded) and its ledger, verified to belong together (see
    the module doc). Every command that charges or reads the production budget goes through
    here. `ledger`: a ``postgresql://`` URL (default: the manifest's, else ``ledger.sqlite``);
    `read_only` opens a ledger that refuses to charge (``dprdm eval``)."""
    index_dir = Path(index_dir)
    index, files = _open_index(index_dir)
    binding = binding_of(index_dir)
    url = _ledger_location(index_dir, binding, ledger)
    ledger_path = index_dir / LEDGER_FILENAME
    if binding is None:
        if ledger_path.exists():
            raise LedgerBindingError(
                f"{index_dir} holds a ledger that is not bound to the index (created by an "
                "older dprdm): refused. Keep it (it records what was released); build a NEW "
                "index (a new data set) in another directory and run `dprdm budget init` there."
            )
        raise LedgerBindingError(
            f"{index_dir} has no privacy ledger; create one with `dprdm budget init {index_dir} "
            "--epsilon E --delta D --k K --q Q --sigma S` (or --calibrate --queries T)"
        )
    missing = (
        f"{_manifest_path(index_dir)} names ledger {binding['ledger_id']} but "
        "{what} is missing (deleted?). Refused: nothing is charged or released; a "
        "deleted ledger does not forget the releases it recorded. Restore the ledger from a "
        f"backup, or (voiding the guarantee) `dprdm budget init {index_dir} {NEW_BUDGET_FLAG}`."
    )
    if url is None and not ledger_path.is_file():
        raise LedgerBindingError(missing.format(what=LEDGER_FILENAME))
    if not (index_dir / WATERMARK_FILENAME).is_file():
        raise LedgerBindingError(
            f"{index_dir}/{WATERMARK_FILENAME} is missing: without it a rolled-back ledger cannot "
            "be detected. Refused: nothing is charged or released. Restore it from a backup."
        )
    if url is None:  # refuses a rolled-back ledger (below the watermark)
        opened: StoredLedger = SqliteLedger(ledger_path, read_only=read_only)
    else:
        from dprdm.privacy.ledger_postgres import MissingLedgerError, PostgresLedger

        try:
            opened = PostgresLedger(url, read_only=read_only, watermark_dir=index_dir)
        except MissingLedgerError:
            raise LedgerBindingError(missing.format(what=f"the PostgreSQL ledger in "
                                                         f"{binding['ledger_url']}")) from None
    if opened.ledger_id != binding["ledger_id"]:
        raise LedgerBindingError(
            f"{opened.location} has ledger id {opened.ledger_id} but {_manifest_path(index_dir)} names "
            f"{binding['ledger_id']}: this is not the index's ledger. Refused: nothing is "
            "charged or released."
        )
    if opened.embeddings_sha256 != binding["embeddings"]["sha256"]:
        raise LedgerBindingError(
            f"{opened.location} was created for other embeddings than "
            f"{_manifest_path(index_dir)} records. Refused: nothing is charged or released."
        )
    verify_embeddings(index_dir, binding, files)
    return index, opened


def init_budget(index_dir: str | os.PathLike, epsilon: float, delta: float,
                mechanism: MechanismParams, lam: float = 1.0, *, new_budget: bool = False,
                progress: Progress | None = None, ledger: str | None = None
                ) -> tuple[PrivateIndex, StoredLedger]:
    """Create the ledger of an index, pin its mechanism and bind the two (``budget init``).
    `ledger`: a ``postgresql://`` URL whose database receives the ledger (default: the SQLite
    file in the index directory); the manifest records it without its password.

    Refused when the index has (or ever had) a ledger, unless `new_budget` (the operator's
    explicit NEW_BUDGET_FLAG), which is recorded in the new ledger and the manifest's history.
    """
    index_dir = Path(index_dir)
    index, files = _open_index(index_dir)
    if not isinstance(mechanism, MechanismParams):
        raise InvalidParameterError("mechanism must be a MechanismParams (sigma, q, k)")
    lam = check_lam(lam)
    epsilon, delta = accounting.check_epsilon(epsilon), accounting.check_delta(delta)
    if ledger is not None and not is_postgres_url(ledger):
        raise InvalidParameterError("--ledger takes a postgresql:// URL (the default is the "
                                    "SQLite ledger in the index directory)")
    present = ledger_files(index_dir)
    if present:
        raise DprdmError(
            f"{index_dir} already holds a privacy ledger ({', '.join(present)}); a privacy "
            "budget is never reset or replaced"
        )
    manifest = read_manifest(index_dir)
    binding = binding_of(index_dir)
    if binding is not None and not new_budget:
        raise LedgerBindingError(
            f"{index_dir} had a privacy ledger (id {binding['ledger_id']}) that is now missing. "
            f"Refused: a new budget would re-arm queries on records already released. Restore "
            f"the ledger and {WATERMARK_FILENAME} from a backup; only if that is impossible, "
            f"re-run with {NEW_BUDGET_FLAG} ({VOIDS_THE_GUARANTEE})"
        )
    history = list(binding.get("ledger_history", [])) if binding is not None else []
    ledger_id = secrets.token_hex(16)  # 128 random bits
    event = "budget init"
    if binding is not None:
        event = f"new budget replacing lost ledger {binding['ledger_id']}: {VOIDS_THE_GUARANTEE}"
    prints = _fingerprints(index_dir, files, isinstance(index, ShardedIndex), progress)
    history.append({"ledger_id": ledger_id, "created": _now(),
                    "replaces": binding["ledger_id"] if binding is not None else None,
                    "voids_guarantee": binding is not None})
    # The manifest first: a crash before the ledger exists leaves "ledger missing" (refused,
    # recoverable with the flag), never an unbound ledger.
    section = {"ledger_id": ledger_id, "embeddings": prints, "ledger_history": history}
    if ledger is not None:
        from dprdm.privacy.ledger_postgres import public_url

        section["ledger_url"] = public_url(ledger)  # never a password
    _write_manifest(index_dir, dict(manifest, **{MANIFEST_KEY: section}))
    try:
        if ledger is None:
            created: StoredLedger = SqliteLedger.create(
                index_dir, epsilon, delta, mechanism=mechanism, lam=lam, ledger_id=ledger_id,
                embeddings_sha256=prints["sha256"], event=event)
        else:
            from dprdm.privacy.ledger_postgres import PostgresLedger

            created = PostgresLedger.create(
                ledger, epsilon, delta, mechanism=mechanism, lam=lam, ledger_id=ledger_id,
                embeddings_sha256=prints["sha256"], event=event, watermark_dir=index_dir)
    except BaseException:
        _write_manifest(index_dir, manifest)  # bad budget or I/O: the manifest as it was
        raise
    return index, created


def verify_index(index_dir: str | os.PathLike, progress: Progress | None = None) -> dict[str, Any]:
    """``dprdm index verify``: recompute every bound file's full SHA-256 and compare it with the
    manifest's. A match re-records the files' modification times (so later opens stay cheap)."""
    index_dir = Path(index_dir)
    index, files = _open_index(index_dir)
    binding = binding_of(index_dir)
    if binding is None:
        prints = _fingerprints(index_dir, files, isinstance(index, ShardedIndex), progress)
        return {"path": str(index_dir), "bound_to_ledger": False, "sha256": prints["sha256"]}
    result = verify_embeddings(index_dir, binding, files, full=True, progress=progress)
    manifest = read_manifest(index_dir)
    stale = [(name, recorded) for name, recorded in _bound_files(manifest[MANIFEST_KEY])
             if os.stat(index_dir / name).st_mtime_ns != recorded["mtime_ns"]]
    for name, recorded in stale:
        recorded["mtime_ns"] = os.stat(index_dir / name).st_mtime_ns
    if stale:
        _write_manifest(index_dir, manifest)
        result["mtime_rerecorded"] = True
    return dict(result, path=str(index_dir), bound_to_ledger=True,
                ledger_id=binding["ledger_id"])
