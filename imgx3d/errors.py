"""User-facing errors: each names the file or key at fault and the fix.

The CLI prints an :class:`Imgx3dError` as one line and exits with code 2; anything else
is a bug in imgx3d and keeps its traceback.
"""

from __future__ import annotations


class Imgx3dError(Exception):
    """Something the user can fix (a path, a file, a config key)."""


class InputError(Imgx3dError):
    """A file or folder given to imgx3d is missing, unreadable or malformed."""


class ConfigError(Imgx3dError):
    """A config key is unknown, of the wrong type or out of range."""


class CheckpointError(Imgx3dError):
    """A checkpoint or run cannot be used for the requested job."""
