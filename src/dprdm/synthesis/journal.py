"""The job journal: ``<JOBDIR>/journal.sqlite`` (WAL, synchronous=FULL), the job's memory.

It holds the job's parameters, its prompts, and per distinct prompt the released CONDITION vector
(a DP output, post-processed: safe to keep, nothing private), committed right after the release;
then which images are written. Nothing here is private: no neighbour, id, distance or pre-noise
value ever reaches the journal.

A batch moves through: ``begin_batch`` (state ``charging``, committed BEFORE the ledger is
charged) -> ``commit_releases`` (state ``released``: the conditions, the ledger's total and epsilon
after the charge, in one transaction) -> images written -> ``mark_done``. A batch found in state
``charging`` when the journal is opened was interrupted between charge and journal: its queries
may have been spent with nothing kept. It is marked ``lost`` and counted; its prompts are released
again. This is the one batch a crash can waste.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dprdm.errors import DprdmError, InvalidParameterError
from dprdm.synthesis.prompts import PromptRow

JOURNAL_FILENAME = "journal.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = f"""
CREATE TABLE job (id INTEGER PRIMARY KEY CHECK (id = 1), params TEXT NOT NULL,
                  created TEXT NOT NULL, schema_version INTEGER NOT NULL);
CREATE TABLE prompts (idx INTEGER PRIMARY KEY, prompt TEXT NOT NULL, line INTEGER NOT NULL,
                      metadata TEXT NOT NULL, release_key INTEGER NOT NULL);
CREATE INDEX prompts_by_key ON prompts (release_key);
CREATE TABLE batches (id INTEGER PRIMARY KEY AUTOINCREMENT, queries INTEGER NOT NULL,
                      state TEXT NOT NULL CHECK (state IN ('charging', 'released', 'lost',
                                                          'refused')),
                      caller TEXT NOT NULL, started TEXT NOT NULL,
                      ledger_queries_after INTEGER, epsilon_after REAL);
CREATE TABLE releases (release_key INTEGER PRIMARY KEY, batch INTEGER NOT NULL,
                       condition BLOB NOT NULL, ledger_queries INTEGER NOT NULL,
                       epsilon REAL, time TEXT NOT NULL);
CREATE TABLE images (prompt_idx INTEGER NOT NULL, image_idx INTEGER NOT NULL,
                     file_name TEXT NOT NULL, time TEXT NOT NULL,
                     PRIMARY KEY (prompt_idx, image_idx));
CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, started TEXT NOT NULL,
                   summary TEXT);
PRAGMA user_version = {SCHEMA_VERSION};
"""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Journal:
    """One job's journal. Single writer: the job's own process."""

    def __init__(self, job_dir: str | os.PathLike) -> None:
        self.path = Path(job_dir) / JOURNAL_FILENAME
        if not self.path.is_file():
            raise DprdmError(f"no job journal at {self.path}")
        self._conn = self._open(self.path)
        if self._conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
            raise DprdmError(f"{self.path} is not a dprdm job journal (schema {SCHEMA_VERSION})")
        self.params = json.loads(self._conn.execute("SELECT params FROM job").fetchone()[0])

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @classmethod
    def exists(cls, job_dir: str | os.PathLike) -> bool:
        return (Path(job_dir) / JOURNAL_FILENAME).is_file()

    @classmethod
    def create(cls, job_dir: str | os.PathLike, params: dict, rows: list[PromptRow],
               reuse_identical: bool) -> Journal:
        """A new journal holding the parameters and prompts, written in one transaction under a
        temporary name and renamed: a job folder has a complete journal or none."""
        job_dir = Path(job_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        path = job_dir / JOURNAL_FILENAME
        if path.exists():
            raise DprdmError(f"{path} already exists")
        tmp = job_dir / f".{JOURNAL_FILENAME}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN")
            conn.execute("INSERT INTO job VALUES (1, ?, ?, ?)",
                         (json.dumps(params, sort_keys=True), _now(), SCHEMA_VERSION))
            first: dict[str, int] = {}
            conn.executemany(
                "INSERT INTO prompts VALUES (?, ?, ?, ?, ?)",
                ((i, row.prompt, row.line, json.dumps(row.metadata),
                  first.setdefault(row.prompt, i) if reuse_identical else i)
                 for i, row in enumerate(rows)))
            conn.execute("COMMIT")
        finally:
            conn.close()
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        from dprdm.files import fsync_directory
        fsync_directory(job_dir)
        return cls(job_dir)

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    # -- reading ---------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        one = lambda sql: int(self._conn.execute(sql).fetchone()[0] or 0)  # noqa: E731
        return {
            "prompts": one("SELECT COUNT(*) FROM prompts"),
            "distinct": one("SELECT COUNT(DISTINCT release_key) FROM prompts"),
            "released": one("SELECT COUNT(*) FROM releases"),
            "images_done": one("SELECT COUNT(*) FROM images"),
            "queries_journaled": one("SELECT SUM(queries) FROM batches WHERE state='released'"),
            "batches_lost": one("SELECT COUNT(*) FROM batches WHERE state='lost'"),
            "queries_lost_at_most": one("SELECT SUM(queries) FROM batches WHERE state='lost'"),
        }

    def prompts(self) -> list[tuple[int, str, int, dict, int]]:
        """(idx, prompt, line, metadata, release_key) for every prompt, in file order."""
        rows = self._conn.execute(
            "SELECT idx, prompt, line, metadata, release_key FROM prompts ORDER BY idx")
        return [(i, p, line, json.loads(m), key) for i, p, line, m, key in rows]

    def unfinished_prompts(self, images_per_prompt: int) -> list[int]:
        """Prompt indices with fewer than n images done, in file order."""
        rows = self._conn.execute(
            "SELECT p.idx FROM prompts p LEFT JOIN images i ON i.prompt_idx = p.idx "
            "GROUP BY p.idx HAVING COUNT(i.image_idx) < ? ORDER BY p.idx", (images_per_prompt,))
        return [int(r[0]) for r in rows]

    def released_keys(self, keys: Iterable[int]) -> set[int]:
        keys = list(keys)
        marks = ",".join("?" * len(keys))
        rows = self._conn.execute(
            f"SELECT release_key FROM releases WHERE release_key IN ({marks})", keys)
        return {int(r[0]) for r in rows}

    def conditions(self, keys: Iterable[int]) -> dict[int, tuple[np.ndarray, int, float]]:
        """release_key -> (condition float32, ledger queries after release, epsilon after)."""
        keys = list(keys)
        marks = ",".join("?" * len(keys))
        rows = self._conn.execute(
            f"SELECT release_key, condition, ledger_queries, epsilon FROM releases "
            f"WHERE release_key IN ({marks})", keys)
        return {int(k): (np.frombuffer(blob, dtype=np.float32).copy(), int(t),
                         None if e is None else float(e))
                for k, blob, t, e in rows}

    def done_images(self, prompt_idx: Iterable[int] | None = None) -> set[tuple[int, int]]:
        if prompt_idx is None:
            rows = self._conn.execute("SELECT prompt_idx, image_idx FROM images")
        else:
            idx = list(prompt_idx)
            rows = self._conn.execute(
                f"SELECT prompt_idx, image_idx FROM images WHERE prompt_idx IN "
                f"({','.join('?' * len(idx))})", idx)
        return {(int(p), int(i)) for p, i in rows}

    def image_rows(self) -> list[tuple[int, int, str]]:
        return [(int(p), int(i), f) for p, i, f in self._conn.execute(
            "SELECT prompt_idx, image_idx, file_name FROM images ORDER BY prompt_idx, image_idx")]

    def batches(self) -> list[dict]:
        rows = self._conn.execute(
            "SELECT id, queries, state, caller, ledger_queries_after, epsilon_after FROM batches "
            "ORDER BY id")
        return [dict(zip(("id", "queries", "state", "caller", "ledger_queries_after",
                          "epsilon_after"), row)) for row in rows]

    # -- writing ---------------------------------------------------------------------------------
    def recover(self) -> int:
        """Mark batches interrupted between charge and journal as lost; returns how many."""
        with self._transaction() as conn:
            return conn.execute(
                "UPDATE batches SET state='lost' WHERE state='charging'").rowcount

    def begin_batch(self, queries: int, caller_prefix: str) -> tuple[int, str]:
        """Record (durably) that a batch of `queries` is about to be charged; returns its id and
        the ledger caller string naming it."""
        with self._transaction() as conn:
            cur = conn.execute(
                "INSERT INTO batches (queries, state, caller, started) "
                "VALUES (?, 'charging', '', ?)",
                (queries, _now()))
            batch = int(cur.lastrowid)
            caller = f"{caller_prefix}:batch{batch}"
            conn.execute("UPDATE batches SET caller=? WHERE id=?", (caller, batch))
        return batch, caller

    def refuse_batch(self, batch: int) -> None:
        """The ledger refused the batch: nothing was charged."""
        with self._transaction() as conn:
            conn.execute("UPDATE batches SET state='refused' WHERE id=?", (batch,))

    def commit_releases(self, batch: int, keys: list[int], conditions: np.ndarray,
                        ledger_queries: int) -> None:
        """Keep the batch's released conditions and the ledger's query total after its charge
        (from the charge receipt: no accounting inside the charge-to-journal window)."""
        conditions = np.ascontiguousarray(conditions, dtype=np.float32)
        if len(keys) != len(conditions):
            raise InvalidParameterError("one condition per released prompt")
        now = _now()
        with self._transaction() as conn:
            conn.executemany(
                "INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?)",
                ((key, batch, cond.tobytes(), ledger_queries, None, now)
                 for key, cond in zip(keys, conditions)))
            conn.execute(
                "UPDATE batches SET state='released', ledger_queries_after=? "
                "WHERE id=? AND state='charging'", (ledger_queries, batch))

    def set_epsilon(self, epsilon: float, batch: int | None = None) -> int:
        """Record the ledger's epsilon after a batch's release (computed after the commit); with
        no batch, for every release still without one (a crash came in between: then it is the
        ledger's epsilon when the job resumed, an upper bound). Returns the rows updated."""
        where = "batch=?" if batch is not None else "epsilon IS NULL"
        args = (epsilon, batch) if batch is not None else (epsilon,)
        with self._transaction() as conn:
            if batch is not None:
                conn.execute("UPDATE batches SET epsilon_after=? WHERE id=?", (epsilon, batch))
            return conn.execute(f"UPDATE releases SET epsilon=? WHERE {where}", args).rowcount

    def missing_epsilon(self) -> bool:
        return self._conn.execute(
            "SELECT EXISTS (SELECT 1 FROM releases WHERE epsilon IS NULL)").fetchone()[0] == 1

    def mark_done(self, images: list[tuple[int, int, str]]) -> None:
        now = _now()
        with self._transaction() as conn:
            conn.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?)",
                             ((p, i, f, now) for p, i, f in images))

    def start_run(self) -> int:
        with self._transaction() as conn:
            return int(conn.execute("INSERT INTO runs (started) VALUES (?)",
                                    (_now(),)).lastrowid)

    def finish_run(self, run: int, summary: dict) -> None:
        with self._transaction() as conn:
            conn.execute("UPDATE runs SET summary=? WHERE id=?", (json.dumps(summary), run))

    def runs(self) -> list[dict]:
        return [{"run": r, "started": s, **(json.loads(x) if x else {"status": "killed"})}
                for r, s, x in self._conn.execute("SELECT id, started, summary FROM runs")]
