"""The errors loom reports to its user in one line (``loom: error: ...``, exit code 2).

They sit below every other module so that any layer can raise them."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line meant for the user."""


class RunError(ValueError):
    """A run directory that cannot be used; the message is one line meant for the user."""
