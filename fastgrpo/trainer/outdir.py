"""Who owns an ``--out-dir`` and what may be written there, checked before any work starts.

* :class:`OutDirLock`: ``<out>/.lock`` holds the owner's pid under an exclusive ``flock``; a
  second run into the same directory is refused, naming that pid.  The owner removes the file
  on every exit path it lives through; the lock dies with its process, so the file of a killed
  run (a dead pid) is simply taken over.
* :func:`check_fresh`: a fresh run refuses a directory that holds an earlier run's outputs
  unless ``--overwrite`` (which deletes exactly those outputs) or ``--resume``.
* :func:`check_writable`: every output path can be written (``<out>/model`` being a file fails
  here, not after the last step).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from fastgrpo.trainer.config import ConfigError

__all__ = ["OutDirLock", "check_fresh", "check_writable", "earlier_outputs", "LOCK_FILE",
           "OUTPUT_FILES", "OUTPUT_DIRS"]

LOCK_FILE = ".lock"
OUTPUT_FILES = ("metrics.jsonl", "samples.jsonl", "summary.json", "curves.png")
OUTPUT_DIRS = ("model", "checkpoints", "tb", "wandb")


class OutDirLock:
    """An exclusive, advisory lock on a run directory (``with OutDirLock(out): ...``)."""

    def __init__(self, out_dir):
        self.path = Path(out_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "OutDirLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ConfigError(f"--out-dir {str(self.path.parent)!r} is in use by another run "
                                  f"(pid {owner}, lock file {self.path}); wait for it to finish or "
                                  f"choose another --out-dir") from None
            # the owner we waited for may have removed the file as it released it: then the
            # lock is on a dead inode; open the path again
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the file, then drop the lock (closing it): a waiting process that opened the
        file before sees it gone and opens the path anew (``acquire``), so no two hold it."""
        if self.fd is not None:
            try:
                if os.path.samestat(os.fstat(self.fd), os.stat(self.path)):
                    os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def earlier_outputs(out_dir) -> list[str]:
    """Names of an earlier run's outputs present in ``out_dir``."""
    out = Path(out_dir)
    found = [n for n in OUTPUT_FILES if (out / n).exists()]
    found += [n + "/" for n in OUTPUT_DIRS if (out / n).is_dir() and any((out / n).iterdir())]
    return found


def check_fresh(out_dir, overwrite: bool, why: str = "", resumable: bool = True) -> None:
    """A fresh run may write into ``out_dir``: refuse one holding an earlier run's outputs,
    or (``overwrite``) delete them.  ``resumable=False``: the refusal does not suggest
    ``--resume auto`` (it found nothing to resume)."""
    found = earlier_outputs(out_dir)
    if not found:
        return
    if not overwrite:
        resume = "pass --resume auto to continue it, " if resumable else \
            "it cannot be continued: pass "
        raise ConfigError(f"--out-dir {str(out_dir)!r} holds an earlier run ({', '.join(found)})"
                          f"{why}; {resume}--overwrite to delete it and start over, or choose "
                          f"another --out-dir")
    out = Path(out_dir)
    for n in found:
        p = out / n.rstrip("/")
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_writable(out_dir, files=OUTPUT_FILES, dirs=OUTPUT_DIRS) -> None:
    """Every output path under ``out_dir`` can be written: the directory itself is writable,
    ``files`` are not directories and ``dirs`` are not files (ConfigError naming the path)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {str(out)!r} is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create --out-dir {str(out)!r}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out-dir {str(out)!r} is not writable")
    for n in files:
        if (out / n).is_dir():
            raise ConfigError(f"output file {str(out / n)!r} is a directory; remove it or choose "
                              f"another --out-dir")
    for n in dirs:
        p = out / n
        if p.exists() and not p.is_dir():
            raise ConfigError(f"output directory {str(p)!r} is a file; remove it or choose "
                              f"another --out-dir")
        if p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"output directory {str(p)!r} is not writable")
