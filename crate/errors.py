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
    """A checkpoint file cannot be used: unreadable, torn, or holding more than data; `field` is the file."""

    def __reduce__(self):
        return (CheckpointError, (self.field, self.message))
