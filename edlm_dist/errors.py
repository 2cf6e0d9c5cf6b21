"""Errors that carry a one-line message naming the problem and the fix.

The CLI prints ``error: <message>`` for any :class:`EdlmError` and exits with status 2,
so users never see a traceback from deep inside for bad input. The exit statuses every ``edlm``
command and launcher agree on live here too (this module imports nothing, so launchers can read
them without importing torch).
"""

ERROR_EXIT_CODE = 2  # bad input: one `error: ...` line, nothing lost
REQUEUE_EXIT_CODE = 3  # `edlm train` stopped on a preemption signal after a checkpoint: "requeue me"


class EdlmError(Exception):
    """Base class: a user-facing failure with a clear one-line message."""


class ConfigError(EdlmError):
    """Invalid configuration or command-line override."""


class DataError(EdlmError):
    """Missing, corrupt or mismatching data (shards, manifest, input files, tokenizer files)."""


class CheckpointError(EdlmError):
    """A checkpoint that cannot be written or does not match the run."""


class SamplingError(EdlmError):
    """Invalid sampling settings or numerically invalid sampling state (NaN energies)."""


class TrainingError(EdlmError):
    """A training run that must stop (NaN/Inf loss or state, a diverging loss, dead peer)."""


class OutputError(EdlmError):
    """An output that cannot be written: disk full, read-only file system, a file where a folder belongs,
    or a folder another run is using."""
