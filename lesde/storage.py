"""Files that survive interruption and shared use: atomic writes, one writer per directory,
stray temporary files, and loading of checkpoints that cannot run code.

* :func:`atomic_write` writes a file through a temporary file in the same directory and an
  ``os.replace``: a reader (or a run killed at any instant) sees either the old file or the new
  one, never a mixture; the temporary file is removed when the write fails, and temporary files
  of the same target left by killed writers of this host are removed by the next write.
* :class:`DirectoryLock` makes a directory (a trajectory store, a sweep folder) single-writer.
  The lock is a file ``lesde.lock`` inside it holding the writer's pid, host and start time, and
  an advisory ``flock`` on that file, which the kernel releases when the writer dies (``kill -9``
  included). A second writer gets :class:`DirectoryLockedError` naming the holder. A lock file
  left by a writer that died on this host is recognised (its ``flock`` is free) and taken over
  with a warning; a lock file written on another host is refused, because whether its writer is
  alive cannot be checked from here: the message names the host and says how to clear it.
* :func:`remove_stale_temporaries` removes temporary files left by killed writers (call it only
  while holding the directory's lock).
* :func:`safe_torch_load` reads a ``torch.save`` file with ``weights_only=True``: tensors, plain
  containers, numbers and strings (and numpy arrays of plain dtypes, rebuilt without running
  code). A file that needs anything else to be unpickled is refused with
  :class:`UnsafeFileError` before anything in it runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import secrets
import socket
import time
import warnings
from typing import Optional

__all__ = ["atomic_write", "DirectoryLock", "DirectoryLockedError", "UnsafeFileError",
           "remove_stale_temporaries", "safe_torch_load", "check_output_path", "LOCK_NAME"]

LOCK_NAME = "lesde.lock"
_TMP_TAG = ".lesde-tmp-"
# temporary names used by lesde (current and earlier versions) and by zarr's atomic writer
_STALE_PATTERNS = (
    re.compile(r"^\..*\.lesde-tmp-.*$"),            # atomic_write
    re.compile(r"^.*\.[0-9a-f]{32}\.partial$"),     # zarr's LocalStore
    re.compile(r"^checkpoint\.ckpt\.tmp-\d+$"),     # earlier lesde checkpoints
    re.compile(r"^chunk_\d+\.parquet\.tmp\d+$"),    # earlier lesde sweep chunks
    re.compile(r"^runs\.parquet\.tmp\d+$"),
    re.compile(r"^(config\.json|table\.csv)\.tmp$"),
)


class DirectoryLockedError(OSError):
    """Another writer holds the directory (or held it on another host)."""


class UnsafeFileError(ValueError, pickle.UnpicklingError):
    """A file would need to run code (an arbitrary pickled object) to be read; it was refused."""


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------
def _host_tag() -> str:
    import hashlib

    return hashlib.sha256(_host().encode()).hexdigest()[:6]


def _temp_name(path: str) -> str:
    head, tail = os.path.split(os.path.abspath(path))
    root, ext = os.path.splitext(tail)
    # keep the extension last: some writers (matplotlib) pick the format from it
    return os.path.join(head, f".{root}{_TMP_TAG}{_host_tag()}-{os.getpid()}-"
                              f"{secrets.token_hex(4)}{ext}")


def _remove_dead_siblings(path: str) -> None:
    """Remove temporary files of ``path`` left by writers of this host that no longer run
    (a write killed between its temporary file and the rename)."""
    head, tail = os.path.split(os.path.abspath(path))
    root, ext = os.path.splitext(tail)
    pattern = re.compile(rf"^\.{re.escape(root)}{re.escape(_TMP_TAG)}{_host_tag()}-(\d+)-"
                         rf"[0-9a-f]+{re.escape(ext)}$")
    try:
        names = os.listdir(head)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(head, name))


@contextlib.contextmanager
def atomic_write(path, mode: str = "wb", fsync: bool = True, **kwargs):
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    Usage: ``with atomic_write(path, "w") as f: f.write(text)``. If the block raises (or the
    process is killed), ``path`` is left as it was and the temporary file is removed (or, after
    a kill, recognised as stale by :func:`remove_stale_temporaries`). ``kwargs`` go to ``open``.
    """
    if "r" in mode or "a" in mode or "+" in mode:
        raise ValueError(f"atomic_write opens files for writing only, got mode {mode!r}")
    path = os.fspath(path)
    _remove_dead_siblings(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_temp_path(path) -> str:
    """A temporary path beside ``path`` (same extension) for writers that need a name rather
    than a file object; pair it with ``os.replace(tmp, path)`` and remove it on failure."""
    return _temp_name(os.fspath(path))


def check_output_path(path, what: str = "output file", directory: bool = False) -> str:
    """Check, before any work, that ``path`` can be written: the nearest existing ancestor is
    a writable directory, and ``path`` itself is not a directory (a file is expected) or not a
    file (a directory is expected). Missing parent directories are fine (they will be created).

    Raises ``ValueError`` naming ``what`` and the path.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        if directory and not os.path.isdir(path):
            raise ValueError(f"{what} {path} exists and is not a directory")
        if not directory and os.path.isdir(path):
            raise ValueError(f"{what} {path} is a directory; give a file name")
        probe = path if directory else os.path.dirname(path)
    else:
        probe = os.path.dirname(path)
        while probe and not os.path.exists(probe):
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        if not os.path.isdir(probe):
            raise ValueError(f"{what} {path}: {probe} is not a directory")
    # try it: permission bits say nothing for root or on a read-only mount
    import tempfile

    try:
        fd, name = tempfile.mkstemp(prefix=".lesde-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ValueError(f"{what} {path}: the directory {probe} is not writable "
                         f"({exc.strerror})") from None
    return path


def remove_stale_temporaries(directory, recursive: bool = False) -> list:
    """Remove temporary files left in ``directory`` by killed writers; returns their paths.

    Call only while holding the directory's :class:`DirectoryLock` (with it, no other process is
    writing there, so every temporary file is stale).
    """
    removed = []
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return removed
    walker = os.walk(directory) if recursive else [(directory, [], os.listdir(directory))]
    for root, _dirs, files in walker:
        for name in files:
            if any(p.match(name) for p in _STALE_PATTERNS):
                full = os.path.join(root, name)
                with contextlib.suppress(FileNotFoundError):
                    if os.path.isfile(full):
                        os.unlink(full)
                        removed.append(full)
    return removed


# --------------------------------------------------------------------------------------------
# one writer per directory
# --------------------------------------------------------------------------------------------
def _host() -> str:
    return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class DirectoryLock:
    """Exclusive writer lock on a directory (see the module docstring).

    ``DirectoryLock(directory, what="trajectory store")``; :meth:`acquire` (or ``with``) raises
    :class:`DirectoryLockedError` when another writer holds it; :meth:`release` removes the lock
    file. ``what`` names the directory in messages.
    """

    def __init__(self, directory, what: str = "directory"):
        self.directory = os.fspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self.what = what
        self._fd: Optional[int] = None

    # -- reading a holder's record --------------------------------------------------------
    @staticmethod
    def _read_record(fd) -> dict:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            raw = os.read(fd, 65536)
            rec = json.loads(raw.decode()) if raw.strip() else {}
            return rec if isinstance(rec, dict) else {}
        except (OSError, ValueError, UnicodeDecodeError):
            return {}

    @staticmethod
    def _describe(rec: dict) -> str:
        if not rec:
            return "a writer whose lock record is unreadable"
        since = rec.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(
            since, (int, float)) else "an unknown time"
        return f"pid {rec.get('pid')} on host {rec.get('host')!r} (since {when})"

    def _busy(self, rec: dict) -> DirectoryLockedError:
        return DirectoryLockedError(
            f"{self.what} {self.directory} is being written by another process: "
            f"{self._describe(rec)}; wait for it to finish (a directory has one writer at a time)"
        )

    def acquire(self) -> "DirectoryLock":
        if self._fd is not None:
            raise RuntimeError("lock already held by this object")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            fcntl = None
        for _attempt in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise DirectoryLockedError(
                    f"cannot create the lock file {self.path} ({exc.strerror}); the {self.what} "
                    "must be in a writable directory") from None
            try:
                flocked = fcntl is not None
                if flocked:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise self._busy(self._read_record(fd)) from None
                    except OSError:  # a file system without flock: fall back on the pid
                        flocked = False
                # the file we locked must still be the one at self.path (a releasing writer
                # unlinks it; a concurrent taker may have replaced it)
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(self.path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                rec = self._read_record(fd)
                if rec:
                    if rec.get("host") != _host():
                        raise DirectoryLockedError(
                            f"{self.what} {self.directory} has a lock file written on another "
                            f"host: {self._describe(rec)}. Whether that writer is still running "
                            f"cannot be checked from here; if no process on {rec.get('host')!r} "
                            f"writes to it any more, delete {self.path} and run again")
                    if not flocked and (rec.get("pid") == os.getpid()
                                        or _pid_alive(rec.get("pid", -1))):
                        raise self._busy(rec)
                    warnings.warn(
                        f"{self.what} {self.directory}: taking over the lock left by "
                        f"{self._describe(rec)}, which is no longer running (it was interrupted; "
                        "what it had saved is kept)", RuntimeWarning, stacklevel=3)
                record = {"pid": os.getpid(), "host": _host(), "since": time.time()}
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, json.dumps(record).encode())
                os.fsync(fd)
                self._fd = fd
                return self
            except BaseException:
                if self._fd is None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                raise
        raise DirectoryLockedError(f"could not lock {self.directory}: the lock file keeps changing")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# --------------------------------------------------------------------------------------------
# checkpoints that cannot run code
# --------------------------------------------------------------------------------------------
def _numpy_safe_globals() -> list:
    """numpy's array-rebuilding functions and plain dtype classes: what a pickled numpy array
    of numbers refers to. Rebuilding such an array runs no user code."""
    import numpy as np

    out = [np.ndarray, np.dtype]
    for mod, name in (("numpy._core.multiarray", "_reconstruct"),
                      ("numpy.core.multiarray", "_reconstruct"),
                      ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar")):
        try:
            import importlib

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
              np.uint64, np.float16, np.float32, np.float64):
        out.append(type(np.dtype(t)))
    return out


def safe_torch_load(path, map_location="cpu", what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)`` with clear errors naming the file.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeFileError: the file holds a pickled object other than tensors, plain containers,
            numbers, strings and numpy arrays of numbers (e.g. a crafted pickle calling
            ``os.system``); nothing in it was run.
        ValueError: the file is truncated or not a torch file.
    """
    import torch

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln),
                      lines[-1] if lines else type(exc).__name__)
        kind = ("it names a global that could run code when unpickled" if "GLOBAL" in reason
                else "it is not a plain tensor file (corrupt, or holding objects that could run "
                     "code when unpickled)")
        raise UnsafeFileError(
            f"refused to load {what} {path}: {kind} ({reason}). lesde reads only tensors, "
            "numbers, strings and plain containers; nothing in the file was run") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError,
            AttributeError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        msg = msg.split(". ")[0]
        raise ValueError(f"{what} {path} is truncated or corrupt ({type(exc).__name__}: "
                         f"{msg})") from None
