"""Typed errors shared across the package; each message says what is wrong and where."""


class StreamDetectorError(Exception):
    """Base class for every error this package raises on purpose."""


class DatasetError(StreamDetectorError):
    """A dataset directory, entity or file is missing or malformed."""


class ArtifactError(StreamDetectorError):
    """A model artifact is unreadable, tampered with, or does not match what is expected."""


class ConfigError(StreamDetectorError):
    """Settings are invalid or inconsistent."""
