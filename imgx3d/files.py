"""Writing files so that an interruption never leaves a half-written file under its final name.

Every file imgx3d writes goes through :func:`atomic_write` (a temporary file in the same folder,
then a rename), which is also where "no room" errors become one-line messages naming the file.
A module of its own at the bottom of the package: config, checkpoints, data, evaluation,
inference, training and synthesis all write files, and none of them should import another
stage for it.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from imgx3d.errors import resource_error


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: no half-written file under its final name.

    Every file imgx3d writes goes through here, so this is where "no room" errors (a full
    disk, a file-size limit, a quota, a read-only file system) become one-line
    :class:`~imgx3d.errors.ResourceError`\\ s naming ``path``; the temp file is removed and a
    previous file under ``path`` stays as it was.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; outputs get the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        no_room = resource_error(err, path) if isinstance(err, OSError) else None
        if no_room is not None:
            raise no_room from None
        raise


def csv_text(fields: list[str], rows: list[dict[str, Any]]) -> str:
    """Rows as CSV text with a header line (keys outside ``fields`` are left out)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a UTF-8 text file (CSV, JSON, YAML, Markdown) through :func:`atomic_write`."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
