"""Errors a user can cause. The CLI prints their message as one sentence and exits non-zero."""


class UserError(Exception):
    """Base of every user-facing error: bad path, bad flag combination, corrupt file."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid."""


class DataError(UserError):
    """Data cannot be found, read or used."""


class CheckpointError(UserError):
    """A run directory or checkpoint is missing, incomplete or does not match."""


class SystemRefusal(UserError):
    """The system refused: no permission to write where the user asked (exit 1, as for an OSError)."""

    exit_code = 1


def check_count(flag: str, value, lo: int, hi: int, zero: str = "") -> None:
    """A count option of any command (steps, items, processes, runs), ranged as pretrain's fields are: one
    ConfigError sentence naming the flag when `value` is not an integer from lo to hi. zero: what 0 means when lo
    is 0 (e.g. "all")."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        accepts = f"0 ({zero}) or an integer from 1 to {hi}" if zero and lo == 0 else f"an integer from {lo} to {hi}"
        raise ConfigError(f"{flag} must be {accepts}, got {value!r}")
