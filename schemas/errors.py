"""Errors that tuneq raises on purpose.

Each message says what went wrong and what to do next; the CLI prints it as ``Error: …`` and
exits with code 1, and a worker records it on the failed job. Anything that is not a
``TuneqError`` is a bug and keeps its traceback.
"""


class TuneqError(Exception):
    """Base class for every error a person can act on."""


class ConfigError(TuneqError):
    """A setting (``TUNEQ_*`` variable) or a job file is invalid."""


class DataError(TuneqError):
    """Input data cannot be used: missing file or column, bad labels, empty data."""


class PathRefused(DataError):
    """A job names a path outside the folders its worker may use."""


class ModelError(TuneqError):
    """A model cannot be found or loaded."""


class TrainingDiverged(TuneqError):
    """A fine-tune ended no better than a constant guess: nothing worth registering."""


class JobNotFound(TuneqError):
    """No job has the id that was given."""


class ModelNotFound(ModelError):
    """No registered model has the name (or version) that was given."""


class DataUnavailable(DataError):
    """A data set on the Hugging Face Hub cannot be reached (offline or unknown)."""


class JobStateError(TuneqError):
    """The job is in a state that does not allow what was asked (cancel a finished job)."""


class SpecUnreadable(TuneqError):
    """A job's spec that this worker cannot read (written by a newer tuneq, or edited)."""
