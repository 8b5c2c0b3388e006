"""Atomic file replacement: a reader sees the old file or the new one, never half of one.

Write to a temporary file in the destination's folder (same filesystem, so the
rename is atomic), flush and fsync it, then rename it over the destination. If
anything fails, or the process is interrupted by an exception, the temporary
file is removed and the destination is untouched. (After SIGKILL a stray
``.NAME.*.tmp`` may remain; it is never read as data.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Literal


@contextmanager
def atomic_open(path: Path, mode: Literal["w", "wb"] = "w") -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; on clean exit it replaces ``path``.

    Text mode writes UTF-8 with ``\\n`` newlines. Parent folders are created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); a pool is shared data (Docker, other
        # users, DVC's cache), so give it the mode open() would: 0666 less the umask.
        os.fchmod(fd, 0o666 & ~_umask())
        text = {"encoding": "utf-8", "newline": ""} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as handle:  # type: ignore[call-overload]
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_text_if_file(path: Path) -> str | None:
    """``path``'s UTF-8 text, or None when it is not a file (absent records, lock files)."""
    return path.read_text(encoding="utf-8") if path.is_file() else None


def put_back(path: Path, data: bytes | None) -> None:
    """Make ``path`` hold ``data`` again (atomically, only if it differs), or not exist
    when ``data`` is None: how a rolled-back command restores a file it saved."""
    if data is None:
        path.unlink(missing_ok=True)
    elif not path.is_file() or path.read_bytes() != data:
        with atomic_open(path, "wb") as handle:
            handle.write(data)


def _umask() -> int:
    """The process's umask (read by setting it and putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the renames still happened
    finally:
        os.close(fd)
