"""The one exception family a user can cause: each message names the file/key and what to do."""


class JpeftError(Exception):
    """Base class for every error caused by user input (files, configs, adapters)."""


class CheckpointError(JpeftError):
    """A model checkpoint directory is missing, corrupted or cannot be honoured."""


class AdapterError(JpeftError):
    """An adapter directory does not fit the base model or is malformed."""


class ConfigError(JpeftError):
    """A run configuration key or value is invalid."""


class DataError(JpeftError):
    """A data file or row is malformed."""
