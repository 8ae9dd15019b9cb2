"""User-facing errors: each names the file or key at fault and the fix.

The CLI prints an :class:`Imgx3dError` as one line and exits with its ``exit_code`` (2, or
128 + the signal number for an interruption); anything else is a bug in imgx3d and keeps its
traceback. :func:`resource_error` is the one place where the operating system's "no room"
errors (full disk, file-size limit, quota, read-only file system) become such a line.
"""

from __future__ import annotations

import errno
from pathlib import Path


class Imgx3dError(Exception):
    """Something the user can fix (a path, a file, a config key)."""

    exit_code = 2


class InputError(Imgx3dError):
    """A file or folder given to imgx3d is missing, unreadable or malformed."""


class ConfigError(Imgx3dError):
    """A config key is unknown, of the wrong type or out of range."""


class CheckpointError(Imgx3dError):
    """A checkpoint or run cannot be used for the requested job."""


class ResourceError(Imgx3dError):
    """The machine ran out of something the job needs: disk space, memory (host or GPU)."""


class Interrupted(Imgx3dError):
    """The job stopped at a safe point after SIGTERM or SIGINT; the exit code is 128 + the signal."""

    def __init__(self, message: str, signum: int, resume_dir: Path | None = None):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum
        self.resume_dir = resume_dir  # a training run's folder: continue it with --resume


# errno → what ran out, and what a user does about it
_NO_ROOM = {
    errno.ENOSPC: ("the disk is full", "free space there or choose another output folder"),
    errno.EFBIG: ("the file is larger than this process may write (file-size limit, ulimit -f)",
                  "raise the limit or write to another file system"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within your quota or choose another output folder"),
    errno.EROFS: ("the file system is read-only", "choose a writable output folder"),
}


def resource_error(err: OSError, path: str | Path | None = None) -> ResourceError | None:
    """The one-line error for an ``OSError`` that means "no room to write" (ENOSPC, EFBIG,
    EDQUOT, EROFS), naming ``path`` (else the error's own file name); None for any other error."""
    if err.errno not in _NO_ROOM:
        return None
    what, fix = _NO_ROOM[err.errno]
    where = path or err.filename or "a file"
    return ResourceError(f"{where}: could not be written: {what} ({errno.errorcode[err.errno]}); {fix}, then run "
                         "the same command again (finished outputs and the last checkpoint are kept)")
