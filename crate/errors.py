"""Errors the platform raises for bad input, before expensive work starts."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; `field` is its dotted path (e.g. ``train.zero_stage``)."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # picklable, so it crosses Ray task and actor boundaries intact
        return (ConfigError, (self.field, self.message))

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its field path nested under `prefix`."""
        return ConfigError(f"{prefix}.{self.field}" if prefix else self.field, self.message)


class CheckpointError(ConfigError):
    """A checkpoint cannot be trusted or read: unreadable, torn, damaged, or holding more than data (which
    loading would execute). `field` is the file or checkpoint at fault; the message says what is wrong."""

    def __init__(self, message: str, field: str = "checkpoint"):
        super().__init__(field, message)

    def __reduce__(self):
        return (CheckpointError, (self.message, self.field))
