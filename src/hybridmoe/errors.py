"""User-facing errors.

Anything a user can cause (a bad path, a corrupt file, a mismatched adapter, malformed data, a bad config key) is
raised as :class:`HybridMoEError` with one line that names the thing and the fix. The CLI prints that line and exits
non-zero with no traceback; library callers can catch it.
"""

from __future__ import annotations


class HybridMoEError(Exception):
    """An error the user can fix; its message is one line naming the file/key/tensor and what to do."""

    def __init__(self, message: str = "", *args):
        # One line by construction: a message may quote user text (a config key, a tensor name, a record's keys)
        # that holds line breaks; they are shown escaped.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"), *args)


class CheckpointError(HybridMoEError):
    """A model checkpoint is missing, corrupt or does not fit the config."""


class AdapterError(HybridMoEError):
    """An adapter is missing, corrupt, non-finite or does not fit the model."""


class ConfigError(HybridMoEError):
    """A training/chat config key is unknown, missing or has a bad value."""


class DataError(HybridMoEError):
    """A dataset file or record is malformed."""


class NonFiniteError(HybridMoEError):
    """NaN/Inf found where it must not be (adapter tensors, logits, repeated non-finite training steps)."""


class GPUOutOfMemoryError(HybridMoEError):
    """The GPU ran out of memory; the message estimates what fits and names the setting to change."""


class FileSystemError(HybridMoEError):
    """Reading or writing a path failed in the filesystem (disk full, read-only, permission, path is a file, ...);
    the message names the path, the errno's meaning and the fix. Nothing half-written is left behind."""
