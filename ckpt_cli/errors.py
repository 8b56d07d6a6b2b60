"""Errors a user can cause. Each is shown as one line and maps to an exit code in the CLI's table.

Anything that is not a `CkptError` is a bug and keeps its traceback.
"""

from __future__ import annotations


class CkptError(Exception):
    """Base of every failure the user can cause or fix."""


class SourceError(CkptError):
    """A source checkpoint is missing, unreadable, truncated or malformed."""


class UnknownModelError(CkptError):
    """A model name, family or architecture this tool does not know."""


class ConfigMismatchError(CkptError):
    """The source's config.json disagrees with the named model's reference hyperparameters."""


class ShapeMismatchError(CkptError):
    """A tensor has another shape or dtype than the plan expects."""


class OutputError(CkptError):
    """The output location exists, cannot be written, or has too little free space."""


class DiskFull(OutputError):
    """The output's disk (or quota) filled up while writing; the message says what was kept."""


class UnsupportedError(CkptError):
    """A feature of the source that this tool refuses instead of silently mishandling."""


class RemoteError(CkptError):
    """The Hugging Face hub refused or failed a request (gated repo, not found, offline)."""


class VerificationFailed(CkptError):
    """verify-logits ran, and the models disagree beyond the tolerance."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM after which something was kept for the user (the message says what)."""
