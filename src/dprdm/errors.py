"""The exceptions dprdm raises on purpose. Messages never carry private data."""


class DprdmError(Exception):
    """Base class for every error dprdm raises deliberately."""


class InvalidParameterError(DprdmError, ValueError):
    """A parameter is outside its valid range; nothing was spent or written."""


class BudgetExceededError(DprdmError):
    """A release would exceed the privacy budget; it was refused and nothing was charged."""


class EmbeddingIndexError(DprdmError):
    """An embedding index is missing, malformed or inconsistent."""


class LedgerBindingError(DprdmError):
    """A private index and its ledger do not belong together (missing, replaced or rolled-back
    ledger, changed embeddings); refused before anything is charged or released."""
