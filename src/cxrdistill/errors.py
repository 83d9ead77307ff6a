"""Exceptions with messages that name the record and the problem."""

from __future__ import annotations


class CxrDistillError(Exception):
    """Base class of every error this package raises on purpose."""


class ManifestError(CxrDistillError):
    """A manifest (or the source it was built from) is malformed; the message lists every problem."""


class ImageReadError(CxrDistillError):
    """An image file cannot be decoded into a radiograph."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(CxrDistillError):
    """A run config has an unknown key or a value of the wrong type."""


class CheckpointError(CxrDistillError):
    """A checkpoint is missing, truncated, corrupt or unsafe to load."""
