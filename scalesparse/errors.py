"""The project's error types. User mistakes raise these; the CLI prints them as one line."""


class ScalesparseError(Exception):
    """Base class: a problem the user can fix, described in one readable line."""


class ConfigError(ScalesparseError):
    """A config value is missing, misspelt, of the wrong type or out of range."""


class CheckpointError(ScalesparseError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model."""


class DataError(ScalesparseError):
    """A corpus or tokenizer could not be found, fetched or verified."""


class LaunchError(ScalesparseError):
    """A Ray cluster cannot be reached, or a submitted job could not be started or followed."""
