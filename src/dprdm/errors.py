"""The exceptions dprdm raises on purpose. Messages never carry private data.

Every class has a stable ``code``: the CLI's ``--json`` error object and the service's error bodies
name errors by it (``{"error": code, "message": ...}``), never by a Python class name, so scripts
can rely on it across versions. The codes are listed in docs/cli.md.
"""


class DprdmError(Exception):
    """Base class for every error dprdm raises deliberately."""

    code = "error"


class InvalidParameterError(DprdmError, ValueError):
    """A parameter is outside its valid range; nothing was spent or written."""

    code = "invalid_parameter"


class BudgetExceededError(DprdmError):
    """A release would exceed the privacy budget; it was refused and nothing was charged."""

    code = "budget_exhausted"


class EmbeddingIndexError(DprdmError):
    """An embedding index is missing, malformed or inconsistent."""

    code = "index_error"


class NotFoundError(DprdmError, FileNotFoundError):
    """A file or directory the command needs does not exist."""

    code = "not_found"


class LedgerBindingError(DprdmError):
    """A private index and its ledger do not belong together (missing, replaced or rolled-back
    ledger, changed embeddings); refused before anything is charged or released."""

    code = "ledger_binding"
