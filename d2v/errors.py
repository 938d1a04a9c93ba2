"""Errors a user can cause. The CLI prints their message as one sentence and exits non-zero."""


class UserError(Exception):
    """Base of every user-facing error: bad path, bad flag combination, corrupt file."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid."""


class DataError(UserError):
    """Data cannot be found, read or used."""


class CheckpointError(UserError):
    """A run directory or checkpoint is missing, incomplete or does not match."""
