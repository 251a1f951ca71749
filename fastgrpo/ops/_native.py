"""The native CPU kernels (``csrc/fastgrpo_csrc/fastgrpo_cpu.cpp``): built on first use, or none.

``native()`` returns the compiled module, or ``None`` when the torch path must serve instead:

* ``FASTGRPO_NATIVE=0`` forces the torch path (tests run both ways); ``=1`` makes a failed
  build an error instead of a fallback; unset (``auto``) builds when it can.
* The build is a JIT build through ``torch.utils.cpp_extension.load`` (g++ or clang, ninja,
  OpenMP), ``-O3 -march=native`` on x86 (AVX-512 intrinsics where the CPU has them, plain
  loops otherwise; ``FASTGRPO_NATIVE_CFLAGS`` replaces the flags), cached in ``$FASTGRPO_CACHE_DIR`` or
  ``~/.cache/fastgrpo/native/`` under a name that holds the torch version and a hash of the
  CPU's flags, so a cache shared between machines never loads code built for another CPU.
  First use costs ~1 min on two cores; later processes load the cached library.
* Without a compiler (or ninja) the torch path runs, after a one-line notice.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

__all__ = ["native", "source_path"]

_STATE: dict = {}


def source_path() -> Path:
    """``fastgrpo_cpu.cpp`` of this checkout (``csrc/``) or of the installed package data."""
    here = Path(__file__).resolve().parents[2] / "csrc" / "fastgrpo_csrc" / "fastgrpo_cpu.cpp"
    if here.is_file():
        return here
    spec = importlib.util.find_spec("fastgrpo_csrc")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fastgrpo_csrc (the C++ sources) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "fastgrpo_cpu.cpp"


def _cpu_tag() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


def build_target() -> tuple[str, Path, list[str]]:
    """The extension's name, its build directory and its compiler flags."""
    version = torch.__version__.replace("+", "_").replace(".", "_")
    name = f"fastgrpo_cpu_t{version}_py{sys.version_info.major}{sys.version_info.minor}"
    root = Path(os.environ.get("FASTGRPO_CACHE_DIR")
                or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastgrpo")
    flags = os.environ.get("FASTGRPO_NATIVE_CFLAGS", "").split() or _default_flags()
    name += _flags_tag(flags)
    return name, root / "native" / f"{name}_{_cpu_tag()}", flags


def _build():
    src = source_path()
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx}) on PATH")
    from torch.utils.cpp_extension import load, verify_ninja_availability
    verify_ninja_availability()
    name, build_dir, flags = build_target()
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's build lock is a plain file (``lock``) that a process killed mid-build leaves
    # behind, and every later process would wait on it forever.  An OS lock (released when its
    # process dies) serialises fastgrpo's builds instead, so a ``lock`` file found while holding
    # it is stale.
    with open(build_dir / "fastgrpo.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            warnings.warn(f"fastgrpo: removing a stale build lock {stale} (a build was killed)",
                          RuntimeWarning, stacklevel=2)
            stale.unlink(missing_ok=True)
        return load(name=name, sources=[str(src)],
                    build_directory=str(build_dir), extra_cflags=flags,
                    extra_ldflags=["-fopenmp"], verbose=False)


def _default_flags():
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
    return ["-O3", "-fopenmp"]


def _flags_tag(flags):
    """'' for the default flags, else a short hash: other flags build another library."""
    if flags == _default_flags():
        return ""
    return "_f" + hashlib.sha1(" ".join(flags).encode()).hexdigest()[:8]


def native():
    """The compiled module, or ``None`` (``FASTGRPO_NATIVE=0``, or the build failed)."""
    mode = os.environ.get("FASTGRPO_NATIVE", "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return None
    if "module" not in _STATE:
        try:
            _STATE["module"] = _build()
        except Exception as exc:  # noqa: BLE001  no compiler, no ninja, a failed compile
            if mode in ("1", "on", "true", "yes"):
                raise RuntimeError(f"FASTGRPO_NATIVE=1 but the native CPU kernels did not "
                                   f"build: {exc}") from exc
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"fastgrpo: native CPU kernels unavailable ({reason[:200]}); using "
                          f"the slower torch path (FASTGRPO_NATIVE=0 silences this)",
                          RuntimeWarning, stacklevel=3)
            _STATE["module"] = None
    return _STATE["module"]
