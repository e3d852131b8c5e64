"""Project exceptions: every error a user can cause is one of these, carrying one clear sentence."""


class TriformError(Exception):
    """Base class for errors caused by user input; the CLI prints the message without a traceback."""


class ConfigError(TriformError, ValueError):
    """A configuration value is invalid or a preset name is unknown."""


class DataError(TriformError):
    """A corpus path is missing or unreadable, or the default corpus could not be fetched."""


class CheckpointError(TriformError):
    """A checkpoint is missing, incomplete or corrupt."""


class GenerationError(TriformError, ValueError):
    """A generation request is invalid (prompt too long, bad sampling parameters)."""
