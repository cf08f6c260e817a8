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


class TrainingError(JpeftError):
    """Training cannot go on as configured (a non-finite loss or gradient)."""


class Stopped(Exception):
    """A stop request (SIGTERM, Ctrl-C) that a training run honoured, saving its checkpoint, ends the command that
    started it too (the demo, which would otherwise go on to its next stage). `signal` names the request."""

    def __init__(self, signal: str, message: str):
        super().__init__(message)
        self.signal = signal


def read_json(path: str, error: type[JpeftError], needed_for: str) -> dict:
    """A JSON file, or `error` naming it: missing (saying what needs it) or malformed."""
    import json
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: not found; {needed_for}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e}); re-save it") from None
