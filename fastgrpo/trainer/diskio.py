"""Writing a run's outputs so that a full disk or an I/O error never costs what is already safe.

* :func:`writing` turns an I/O failure while one file is written (``OSError``, safetensors'
  ``SafetensorError``, ``torch.save``'s ``RuntimeError``) into a :class:`WriteError` naming the
  file, the bytes it needed when known and the space left on its filesystem.
* :func:`write_directory` fills a temporary sibling directory, gives every file the user's
  umask (safetensors creates its files 0600), fsyncs it and renames it into place: the target is
  either complete or absent (an existing one is replaced only by a complete new one).
* :func:`write_file` does the same for one file (``summary.json``).
* :func:`check_safetensors` verifies that a ``.safetensors`` file is complete (header and the
  data it announces).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Callable

__all__ = ["WriteError", "writing", "write_directory", "write_file", "check_safetensors",
           "tensor_bytes", "user_mode", "fsync_file", "fsync_dir",
           "pid_alive"]


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


class WriteError(RuntimeError):
    """An output could not be written (disk full, I/O error); the message names the file, the
    bytes it needed when known, and (``.hint``, set by the trainer) what is left to resume from."""

    def __init__(self, path, needed: int | None, cause: BaseException):
        self.path, self.needed, self.cause = Path(path), needed, cause
        self.hint = ""
        super().__init__(str(path))

    @property
    def no_space(self) -> bool:
        c = self.cause
        text = str(c)
        if isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left" in text or "os error 28" in text or "Disk quota" in text:
            return True
        # torch.save's zip writer reports a short write as "unexpected pos"
        if self.needed is not None and self.free is not None and self.free < self.needed:
            return True
        return False

    @property
    def free(self) -> int | None:
        p = self.path
        while not p.exists() and p != p.parent:
            p = p.parent
        try:
            return shutil.disk_usage(p).free
        except OSError:
            return None

    def __str__(self) -> str:
        c = self.cause
        why = "no space left on device" if self.no_space else \
            (c.strerror if isinstance(c, OSError) and c.strerror else str(c).splitlines()[0][:200])
        size = []
        if self.needed:
            size.append(f"it needs about {_size(self.needed)}")
        if self.free is not None:
            size.append(f"{_size(self.free)} free on that filesystem")
        msg = f"could not write {self.path}: {why}" + (f" ({'; '.join(size)})" if size else "")
        return msg + (f". {self.hint}" if self.hint else "")


def _is_io_error(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    if type(e).__name__ == "SafetensorError":
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("PytorchStreamWriter", "inline_container", "unexpected pos",
                            "No space left", "os error"))


@contextlib.contextmanager
def writing(path, needed: int | None = None):
    """Inside: writing ``path``; an I/O failure becomes a :class:`WriteError` naming it (for a
    directory: the file in it written last, the one the failure cut short)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        if not _is_io_error(e):
            raise
        path = Path(path)
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file()]
            path = max(files, key=lambda p: p.stat().st_mtime_ns, default=path)
        raise WriteError(path, needed, e) from e


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors in a (nested) dict/list (what a file of them needs, about)."""
    import torch
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, dict):
        return sum(tensor_bytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(tensor_bytes(v) for v in tensors)
    return 0


def user_mode(directory: bool = False) -> int:
    """The mode a new file (directory) gets under this process's umask."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(parent: Path, name: str) -> None:
    """Temporary siblings of ``name`` left by dead writers (a kill -9 during a save)."""
    for p in parent.glob(f".tmp-{name}-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def write_directory(final, fill: Callable[[Path], None], verify: Callable[[Path], None] | None = None
                    ) -> Path:
    """Write directory ``final`` atomically: ``fill(tmp)`` writes the files into a temporary
    sibling, ``verify(tmp)`` may raise, the files get the user's umask and are fsync'ed, and the
    directory is renamed into place (an existing ``final`` is moved aside first and removed
    after).  On any failure the temporary directory is removed and ``final`` is as before."""
    final = Path(final)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(parent, final.name)
    tmp = parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        fill(tmp)
        if verify is not None:
            verify(tmp)
        fmode, dmode = user_mode(), user_mode(directory=True)
        for p in sorted(tmp.rglob("*")):
            os.chmod(p, dmode if p.is_dir() else fmode)
            if p.is_file():
                fsync_file(p)
        fsync_dir(tmp)
        old = None
        with writing(final):
            if final.exists():
                old = parent / f".old-{final.name}-{os.getpid()}"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except WriteError as e:  # name the file as it would have been called
        if e.path.is_relative_to(tmp):
            e.path = final / e.path.relative_to(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_file(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary sibling, fsync, rename)."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    try:
        with writing(path, len(data)):
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_safetensors(path) -> None:
    """Raise ``ValueError`` unless ``path`` is a complete safetensors file (its header parses
    and the file holds exactly the data the header announces)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: truncated header")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise ValueError(f"{path}: {size} bytes, its header announces {8 + n + end} (truncated?)")
