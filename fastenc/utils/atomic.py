"""The one way fastenc writes a file: never half-written, whatever kills the process.

Every writer in fastenc goes through `atomic_path` (or the helpers built on it):

    with atomic_path("runs/x/metrics.png") as tmp:   # tmp: runs/x/.metrics.png.<pid>.<random>.tmp.png
        fig.savefig(tmp)                              # write anything to tmp, by any library
    # here the file is complete, fsynced and renamed into place; on an exception tmp is removed instead

The temporary file sits in the target's directory (so the rename is atomic on POSIX), is hidden (a leading dot, so
globs like *.tar never see it), ends with the target's extension (so libraries that infer the format from the name,
PIL and matplotlib, still do) and carries the pid and a random part (so concurrent writers never collide).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from typing import Iterator

TMP_MARK = ".tmp"


def temp_name(path: str) -> str:
    """The temporary sibling of `path` used while writing it."""
    head, tail = os.path.split(path)
    ext = os.path.splitext(tail)[1]
    return os.path.join(head, f".{tail}.{os.getpid()}.{secrets.token_hex(4)}{TMP_MARK}{ext}")


_TEMP = re.compile(r"^\.(?P<target>.+)\.\d+\.[0-9a-f]{8}" + re.escape(TMP_MARK) + r"(?P<ext>\.[^.]*)?$")


def temp_target(name: str) -> str | None:
    """The name of the file a temp_name stands for (one a killed writer left behind), or None for any other
    name."""
    m = _TEMP.match(os.path.basename(name))
    if m is None or os.path.splitext(m["target"])[1] != (m["ext"] or ""):
        return None
    return m["target"]


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of temp_name's."""
    return temp_target(name) is not None


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:  # a platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str, *, fsync: bool = True) -> Iterator[str]:
    """Yield a temporary path to write; on success fsync it, rename it to `path` and fsync the directory. The parent
    directory is created if needed. fsync=False skips the fsyncs (scratch files that a crash may lose, never
    half-written ones)."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if not os.path.exists(tmp):
            raise FileNotFoundError(f"atomic write of {path}: nothing was written to the temporary file {tmp}")
        if fsync:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary directory to fill; on success it becomes `path` (a directory already there is moved aside
    first and removed after), so `path` is always absent, the old complete directory or the new complete one."""
    import shutil

    path = os.fspath(path).rstrip(os.sep)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    tmp = temp_name(path)
    os.makedirs(tmp)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                _fsync_file(os.path.join(root, name))
        old = None
        if os.path.exists(path):
            old = temp_name(path)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str, data: bytes, *, fsync: bool = True) -> str:
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return path


def write_text(path: str, text: str, *, fsync: bool = True) -> str:
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def write_json(path: str, obj, *, indent: int | None = 1, fsync: bool = True, **dumps_kwargs) -> str:
    """JSON with a trailing newline (dumps_kwargs: default=str, sort_keys=True, ...)."""
    return write_text(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n", fsync=fsync)


def save_figure(fig, path: str) -> str:
    """tight_layout, write a matplotlib figure as PNG through atomic_path (PNG whatever the extension), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
