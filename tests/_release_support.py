"""What the pooling and style-estimate tests share: a stand-in backend that embeds prompts, and a
private collection whose records share one style (the case pooling is for)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

SIGMA, DIM = 0.0875, 64  # the demo's epsilon 10 / 1,000-query noise, and d


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class TextOnlyBackend:
    """What conditions() needs of a backend: a name, a space check and the prompts' embeddings."""

    name = "demo"
    space = SimpleNamespace(check_index=lambda *args, **kwargs: None)

    def embed_prompts(self, prompts: list[str]) -> np.ndarray:
        rng = np.random.default_rng(len(prompts))
        return unit(rng.normal(size=(len(prompts), DIM))).astype(np.float32)


def one_style_records(n: int = 200) -> np.ndarray:
    """(n, DIM) unit records around one style direction."""
    rng = np.random.default_rng(5)
    style = unit(rng.normal(size=DIM))
    return unit(style + 0.3 * rng.normal(size=(n, DIM))).astype(np.float32)


def record_releases(rag, releases: list) -> None:
    """Append every array `rag`'s mechanism releases to `releases` (what it charged for)."""
    release = rag.mechanism.release
    rag.mechanism.release = lambda x, caller="", receipts=None: releases.append(
        release(x, caller, receipts)) or releases[-1]
