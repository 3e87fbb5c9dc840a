"""The exception hierarchy shared by every layer.

Three families decide what a caller does next: fix the configuration, try again later, or give up
on this piece of work with a reason.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base class of every error dicomnode raises on purpose."""


class ConfigurationError(DicomNodeError):
    """The configuration (or a model card) is invalid; the message names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


class RetryableError(DicomNodeError):
    """A transient failure (disk, database busy, peer down); the same work may succeed later."""

    def __init__(self, message: str, retry_after_seconds: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class PermanentError(DicomNodeError):
    """A failure that will not change by trying again (bad input, rejected by a peer)."""


class InvalidDatasetError(PermanentError):
    """A received or read dataset lacks what dicomnode needs (UIDs, pixel data, ...)."""


class StorageFullError(RetryableError):
    """The spool or database cannot take more data (disk full or below the free-space floor)."""


class DecodeTimeoutError(PermanentError):
    """Decoding pixel data did not finish within its time limit (possibly a crafted file)."""


class ModelUnavailableError(DicomNodeError):
    """A model package is missing, incomplete or has no trained weights."""
