"""Where `make demo` leaves things, so that `--demo` on generate / eval / serve can find them.

.dprdm-demo/ (git-ignored; override with DPRDM_DEMO_ROOT):
  private/   the private OpenMoji index and its ledger (the calibrated mechanism pinned in it)
  public/    the public (Twemoji + Noto) index, no ledger
  holdout/   held-out OpenMoji images + captions.jsonl (the evaluation reference set)
  data/      the prepared emoji styles;  npm/  the npm packages they came from
  validation/DOMAIN/  a validation domain (a public style held out, e.g. fluent_hc;
             ``dprdm eval --demo --validation``, :mod:`dprdm.validation`): private/ (index +
             ledger), holdout/, public/
"""

from __future__ import annotations

import os
from pathlib import Path

from dprdm.errors import DprdmError


def demo_root() -> Path:
    return Path(os.environ.get("DPRDM_DEMO_ROOT", ".dprdm-demo"))


def private_index_dir() -> Path:
    return demo_root() / "private"


def public_index_dir() -> Path:
    return demo_root() / "public"


def holdout_dir() -> Path:
    return demo_root() / "holdout"


def validation_dir(root: Path | None, domain: str) -> Path:
    """Where validation domain `domain` (a :data:`dprdm.validation.DOMAINS` name) is built."""
    return (root if root is not None else demo_root()) / "validation" / domain


def validation_private_index_dir(root: Path | None, domain: str) -> Path:
    """The domain's private index: its held-out style's images of other concepts + ledger."""
    return validation_dir(root, domain) / "private"


def validation_holdout_dir(root: Path | None, domain: str) -> Path:
    """Its images of the OpenMoji held-out concepts + captions.jsonl (prompts, reference)."""
    return validation_dir(root, domain) / "holdout"


def validation_public_index_dir(root: Path | None, domain: str) -> Path:
    """The domain's public index: the public collections beside the held-out style."""
    return validation_dir(root, domain) / "public"


def require(path: Path) -> Path:
    if not path.exists():
        raise DprdmError(
            f"{path} does not exist: run `make demo` first (from the repository root), "
            "or set DPRDM_DEMO_ROOT"
        )
    return path
