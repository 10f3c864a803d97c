"""The errors a user can act on. Each message names the file, key, shard or value at fault.

Every command turns these into one or a few lines on stderr and exit status 2 (see
:mod:`asc_dist.cli`); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected failure caused by input, configuration or the environment, not by a bug."""


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the offending key."""


class DataError(UserError, RuntimeError):
    """Bad or missing shard data; the message names the shard (and the sample key where known)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written, read, or used by this run; the message names the file."""


class PackError(UserError):
    """A dataset or packing problem; the message names the file (and line) at fault."""


class RunLockedError(UserError):
    """Another live run holds the run dir; the message names the holder."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN or infinite; the message names the steps."""


class FetchError(UserError):
    """A download or install failed; the message names the file and the URL or path at fault."""
