"""One error base class; the CLI prints any S3petError as one line and exits non-zero."""


class S3petError(Exception):
    """Base of every error s3pet raises on purpose (bad input, infeasible request)."""


class ConfigError(S3petError):
    """A setting, space file or CLI argument is malformed."""


class ModelError(S3petError):
    """A model cannot be loaded, or a space matches nothing in it."""


class BudgetError(S3petError):
    """A parameter budget cannot be met (below the smallest candidate, or malformed)."""


class StructureError(S3petError):
    """A structure file is invalid or does not fit the model it is applied to."""


class TaskError(S3petError):
    """A task is unknown, or its data cannot be found or parsed."""


class TrainingError(S3petError):
    """Training diverged: a non-finite loss, weight or gate (the message names the step and the fix)."""
