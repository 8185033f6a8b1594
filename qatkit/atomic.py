"""Every file and folder qatkit writes appears whole or not at all.

`atomic_path(dest)` hands out a private temporary name in dest's own folder (same filesystem, so
the final rename is atomic; private, so two runs never share it); when the block ends without an
exception the temporary is flushed to disk (fsync) and replaces dest, otherwise it is removed. A
killed process, a full disk or a power cut leaves at most a hidden `.name.*.tmp` beside the
destination, never a half-written destination.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

_UMASK = os.umask(0)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


@contextmanager
def atomic_path(dest: str | os.PathLike, folder: bool = False, keep_existing: bool = False) -> Iterator[Path]:
    """A temporary path to write `dest` through (a file, or with `folder` a directory that the
    block fills); renamed onto dest on success, removed on failure. `keep_existing` (folders):
    when another writer put dest there first, theirs is kept and ours dropped."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700; others read what we write
    else:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if folder and keep_existing:
            try:
                os.rename(tmp, dest)  # fails when dest exists and is not empty
            except OSError:
                if not dest.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
            return
        if folder:  # files some writers make 0600 (safetensors through a temporary file): readable like the rest
            for f in tmp.rglob("*"):
                if f.is_file() and not f.stat().st_mode & 0o044:
                    os.chmod(f, 0o644 & ~_UMASK)
        fsync_tree(tmp)  # on disk before it replaces the previous good file: a power cut leaves one or the other
        if folder and dest.is_dir():
            shutil.rmtree(dest)  # os.replace cannot replace a non-empty folder
        os.replace(tmp, dest)
        if not folder:
            os.chmod(dest, 0o644 & ~_UMASK)  # mkstemp makes 0600 files; others read what we write
        _fsync(dest.parent)  # and the rename itself
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def remove_stale(dest: str | os.PathLike) -> int:
    """Remove the temporaries a killed writer of `dest` left beside it (`.name.*.tmp`); for a
    destination only one process writes, such as a run's checkpoint. Returns how many."""
    dest = Path(dest)
    n = 0
    for p in dest.parent.glob(f".{dest.name}.*.tmp"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        n += 1
    return n


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                _fsync(p)
    _fsync(path)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj, **kw) -> None:
    write_text(path, json.dumps(obj, **kw))
