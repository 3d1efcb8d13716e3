"""The embedding index (:mod:`.store`), the ranked searchers over it (:mod:`.search`) and the
public-IVF candidate sets (:mod:`.partition`).

Nothing here adds noise or spends privacy: this package stores unit-norm private embeddings and
answers "which rows, in which exact order, are nearest to this query". The private mechanism in
:mod:`dprdm.privacy` walks those ranked lists; the exact order (descending inner product, ties by
ascending row, -1 padding) is part of its privacy argument, so every searcher guarantees it.
"""

from dprdm.retrieval.search import (
    DEFAULT_NPROBE,
    ExactSearcher,
    FaissFlatSearcher,
    FaissIVFSearcher,
    PublicQuantizer,
    RankedSearcher,
    SearcherKind,
    canonical_scores,
    exact_top_rows,
    make_searcher,
    train_public_quantizer,
)
from dprdm.retrieval.partition import IVFPartition
from dprdm.retrieval.store import (
    LEDGER_FILE,
    EmbeddingIndex,
    build_index,
    load_embeddings,
)

__all__ = [
    "DEFAULT_NPROBE",
    "LEDGER_FILE",
    "EmbeddingIndex",
    "ExactSearcher",
    "FaissFlatSearcher",
    "FaissIVFSearcher",
    "IVFPartition",
    "PublicQuantizer",
    "RankedSearcher",
    "SearcherKind",
    "build_index",
    "canonical_scores",
    "exact_top_rows",
    "load_embeddings",
    "make_searcher",
    "train_public_quantizer",
]
