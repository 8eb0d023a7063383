"""Atomic file writes: a temporary file in the same folder, fsync, rename.

A reader never sees a half-written file, and a crash mid-write leaves the old file in place. A write killed
before its rename leaves its temporary file (`.NAME.XXXXXXXX.mplus-tmp`) behind; the next atomic write into
that folder removes such leftovers. The writer holds an flock on its temporary file until the rename, so a
leftover is told from a live write of another process by trying that lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

TEMP_SUFFIX = ".mplus-tmp"
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(TEMP_SUFFIX))  # what tempfile.mkstemp makes below


@contextlib.contextmanager
def temp_path(folder: Path, name: str) -> Iterator[Path]:
    """A new, locked, empty temporary file in `folder` for a file to be called `name`; removed on exit unless
    commit() renamed it. Stale temporary files of killed writes in `folder` are removed first."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    while True:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=TEMP_SUFFIX)
        fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                break  # locked before another process's remove_stale_temps could take it for a leftover
        os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)
        os.close(fd)


def commit(tmp: Path, path: Path) -> None:
    """Give a written temporary file the mode a plain open() would, make it durable and rename it to `path`."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # after writing: mkstemp makes 0600, and so do writers that replace the file
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    with temp_path(path.parent, path.name) as tmp:
        yield tmp
        commit(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(folder: Path) -> None:
    """Delete the temporary files that killed atomic writes left in `folder`: only names of our own pattern,
    only plain files, only those no live writer holds locked; never anything outside `folder`."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not _TEMP_NAME.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while a live writer holds it
            if os.path.samestat(os.fstat(fd), os.stat(entry.path, follow_symlinks=False)):
                os.unlink(entry.path)
        except OSError:
            pass  # a live write, or gone already
        finally:
            os.close(fd)


def fsync_dir(folder: Path) -> None:
    # Renames and deletions live in the directory entry; fsync the folder so they survive a crash.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
