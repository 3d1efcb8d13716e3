"""Whether a data set or an embedding file is PUBLIC, and who said so.

Public data trains what dprdm releases without privacy protection: the generator (``dprdm
train``) and the coarse quantizer that decides which candidates a private search looks at
(``dprdm index quantize``). Nothing here can tell public from private data by looking at it, so
data is public only when the user has said so, in one of two ways:

* a provenance sidecar written by the tool that prepared the file: ``dprdm encoders embed
  --public`` writes ``EMB.provenance.json`` beside ``EMB.npy`` with ``{"public": true, "source":
  ..., "created": ..., "sha256": ...}``. The digest binds the sidecar to the file: a file replaced
  later (say by private embeddings under the same name) no longer matches and is not public.
  ``embed`` without ``--public`` writes ``"public": false``, which no flag overrides.
* an explicit acknowledgement on the command that uses the data (``--data-is-public``).

The demo's public splits are marked in its own ``data/manifest.json`` (role ``public``), written by
the tool that built them; :mod:`dprdm.generation.training` reads that itself.

Owns: :func:`sidecar_path`, :func:`write_sidecar`, :func:`read_sidecar`, :func:`file_sha256`,
:func:`require_public_file` and :func:`require_public_folder`.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dprdm.errors import InvalidParameterError
from dprdm.files import write_bytes_atomically

SIDECAR_SUFFIX = ".provenance.json"
ACKNOWLEDGE_FLAG = "--data-is-public"
_CHUNK = 1 << 22


def sidecar_path(data_file: str | os.PathLike[str]) -> Path:
    """``EMB.npy`` -> ``EMB.provenance.json`` (beside it)."""
    path = Path(data_file)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_sidecar(data_file: str | os.PathLike[str], *, public: bool, source: str, tool: str,
                  **fields: Any) -> Path:
    """Write the provenance sidecar of `data_file` (already written) atomically; return its path."""
    path = sidecar_path(data_file)
    created = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    record = {"public": bool(public), "source": source, "created": created, "tool": tool,
              "file": Path(data_file).name, "sha256": file_sha256(data_file), **fields}
    write_bytes_atomically(path, (json.dumps(record, indent=1) + "\n").encode())
    return path


def read_sidecar(data_file: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, str]:
    """(the sidecar's record, "") when it exists and matches `data_file`; else (None, why not)."""
    path = sidecar_path(data_file)
    if not path.is_file():
        return None, f"there is no provenance file {path.name} beside it"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, f"its provenance file {path.name} is unreadable"
    if not isinstance(record, dict) or not isinstance(record.get("public"), bool):
        return None, f"its provenance file {path.name} has no 'public' field"
    if record.get("sha256") != file_sha256(data_file):
        return None, (f"its provenance file {path.name} describes another file (the SHA-256 "
                      "differs: the file was replaced or changed after it was written)")
    return record, ""


def require_public_file(data_file: str | os.PathLike[str], acknowledged: bool,
                        use: str) -> dict[str, Any]:
    """The provenance record to store with what is trained on `data_file`, or a refusal.

    `use` says what the file would train (for the error). Public when its sidecar says
    ``"public": true`` or, with no valid sidecar, when the caller passed `acknowledged`
    (``--data-is-public``). A sidecar saying ``"public": false`` is refused even then.
    """
    path = Path(data_file)
    if not path.is_file():
        raise InvalidParameterError(f"no such file: {path}")
    record, why_not = read_sidecar(path)
    digest = record["sha256"] if record else file_sha256(path)
    base = {"file": path.name, "sha256": digest}
    if record is not None and record["public"]:
        return {**base, "public": True, "declared_by": record.get("tool", "provenance file"),
                "source": record.get("source"), "prepared": record.get("created")}
    if record is not None:
        raise InvalidParameterError(
            f"refusing to use {path} to {use}: {sidecar_path(path).name} records it as NOT public "
            f"(prepared by {record.get('tool', 'dprdm')} from {record.get('source')!s} without "
            f"--public). If the images really are public, embed them again with "
            f"`dprdm encoders embed --public`; {ACKNOWLEDGE_FLAG} does not override a file "
            "recorded as private."
        )
    if acknowledged:
        return {**base, "public": True, "declared_by": ACKNOWLEDGE_FLAG}
    raise InvalidParameterError(
        f"refusing to use {path} to {use}: nothing marks it as public data ({why_not}). "
        "Whatever is trained here is released without privacy protection, so it must never see "
        "private records. Embed public images with `dprdm encoders embed --public`, or, if you "
        f"are sure this file holds only public data, pass {ACKNOWLEDGE_FLAG}."
    )


def require_public_folder(folder: str | os.PathLike[str], acknowledged: bool, use: str) -> None:
    """Refuse a plain folder as public training data unless the user acknowledged it."""
    if not acknowledged:
        raise InvalidParameterError(
            f"refusing to {use} on {folder}: nothing marks this folder as public data. The "
            "trained model is released without privacy protection and can reproduce what it was "
            "trained on, so it must never see private images. If every image in it is public, "
            f"pass {ACKNOWLEDGE_FLAG}. (The demo root, whose data/manifest.json marks its public "
            "splits, needs no flag.)"
        )


__all__ = [
    "ACKNOWLEDGE_FLAG", "SIDECAR_SUFFIX", "file_sha256", "read_sidecar", "require_public_file",
    "require_public_folder", "sidecar_path", "write_sidecar",
]
