"""Atomic, verifiable training checkpoints (``--save-every N``, ``--resume DIR|auto``).

API (everything a training loop needs)::

    from fastgrpo.trainer.checkpoint import (save_checkpoint, load_checkpoint, find_latest_valid,
                                     resolve_resume, prune, check_finite_loss,
                                     NonFiniteLossError, CheckpointError)

    # resume (before the loop); None = start fresh
    path = resolve_resume(cfg.resume, run_dir)           # "auto" | a checkpoint dir | a run dir | ""
    start = 0
    if path is not None:
        extra = load_checkpoint(path, model, optimizer, scheduler)   # also restores RNG states
        start = extra["step"]                       # number of completed optimizer steps
        ...restore data position from extra...
    for step in range(start, cfg.steps):
        ...
        check_finite_loss(loss, step + 1)           # raises NonFiniteLossError naming the step
        ...optimizer.step()...
        if cfg.save_every and (step + 1) % cfg.save_every == 0:
            save_checkpoint(run_dir, step + 1, model, optimizer, scheduler,
                            extra={"data": ..., "config": ...}, keep_last=cfg.keep_last)

Layout on disk::

    run_dir/checkpoints/step-00000012/
        model.safetensors     the model's weights (tied weights stored once; LoRA: the adapters only)
        trainer_state.pt      optimizer, scheduler, RNG states (python, numpy, torch CPU, CUDA), extra
        manifest.json         written LAST: step, size and sha256 of every other file

A checkpoint is written into ``checkpoints/.tmp-step-XXXXXXXX-<pid>/``, every file is fsync'ed,
the manifest goes in last, and only then the directory is renamed (``os.replace``, atomic on
POSIX) to ``step-XXXXXXXX``.  A process killed at any point leaves either the previous state
or a complete new checkpoint (plus, at worst, a ``.tmp-*`` directory that is ignored and later
pruned).  ``find_latest_valid`` re-hashes every file against the manifest; a checkpoint that
is corrupt, truncated or has no manifest is reported (``warnings.warn`` + ``logging``, naming
the path and the reason) and skipped, so the previous one is used.

``extra["step"]`` is always set to ``step`` (the number of completed optimizer steps); the RNG
states are captured at save time, so a run resumed after step ``k`` draws exactly the random
numbers the uninterrupted run drew for step ``k + 1`` (``tests/test_checkpoint.py`` kills a run
with SIGKILL mid-step and checks bit-for-bit equality on CPU).  Per-rank RNG states: pass
``rng_states=distributed.gather_rng_states()`` (a list, one per rank) and
``load_checkpoint(..., rank=rank)``.

Non-finite losses: ``check_finite_loss(loss, step)`` raises ``NonFiniteLossError`` whose
message names the step.  The parameters are still those of the last completed step when the
loss is checked before ``optimizer.step()``; ``params_are_finite(model)`` tells whether they can
be trusted, and if so the loop may ``save_checkpoint(..., extra={"stopped": str(err)})`` before
re-raising.  ``save_checkpoint`` itself refuses (``NonFiniteLossError``) to write non-finite
parameters unless ``allow_non_finite=True``.

Distributed models: pass the *unwrapped* model (``fastgrpo.hf.unwrap_model``); for DDP only
rank 0 needs to call ``save_checkpoint``.  FSDP2 (DTensor parameters) is handled by gathering
full state dicts, which is a collective: every rank calls ``save_checkpoint`` and only rank 0
(``write=True``) writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from fastgrpo.hf import unwrap_model
from fastgrpo.trainer.diskio import (WriteError, check_safetensors, fsync_file, pid_alive,
                                     tensor_bytes, write_directory, writing)

__all__ = [
    "CHECKPOINT_DIR",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "STATE_FILE",
    "CheckpointError",
    "CheckpointMismatchError",
    "NonFiniteLossError",
    "capture_rng_state",
    "check_finite_loss",
    "checkpoint_run_id",
    "find_latest_valid",
    "list_checkpoints",
    "load_checkpoint",
    "params_are_finite",
    "prune",
    "resolve_resume",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or loaded (the message names the path)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's tensors do not fit the model (another architecture or vocabulary);
    ``.extra`` holds the checkpoint's training state (its config names its ``--model``)."""

    def __init__(self, message: str, extra: dict | None = None):
        super().__init__(message)
        self.extra = extra or {}


class NonFiniteLossError(FloatingPointError):
    """The loss (or another monitored value) became NaN or inf; ``.step`` holds the step."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


# ----------------------------------------------------------------------------- finiteness


def check_finite_loss(loss, step: int, what: str = "loss") -> None:
    """Raise ``NonFiniteLossError`` if ``loss`` (tensor or number) is NaN or inf.

    The message names the step and says what to do.  One host sync when ``loss`` is a
    CUDA tensor.
    """
    if isinstance(loss, torch.Tensor):
        finite = bool(torch.isfinite(loss.detach()).all())
        value = loss.detach().float().flatten()[0].item() if loss.numel() == 1 else "tensor"
    else:
        value = float(loss)
        finite = math.isfinite(value)
    if not finite:
        raise NonFiniteLossError(
            f"non-finite {what} ({value}) at step {step}: the run stops here. The parameters "
            f"from before this step's update were kept; resume from the last checkpoint with "
            f"--resume auto after lowering --lr, enabling --grad-clip or checking the data.",
            step=step)


def params_are_finite(model: torch.nn.Module) -> bool:
    """True when every parameter and buffer of ``model`` is finite."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point() and not bool(torch.isfinite(_local(t)).all()):
                return False
    return True


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


# ----------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """The RNG states of python ``random``, numpy (if installed), torch CPU and all CUDA devices."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state`` (missing entries are left alone)."""
    if "python" in state:
        random.setstate(state["python"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np
            np.random.set_state(state["numpy"])
        except ImportError:
            pass
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            for i, s in enumerate(cuda_states[:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------- helpers


def _ckpt_root(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def _step_name(step: int) -> str:
    return f"step-{int(step):08d}"


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _is_distributed_tensor_model(model) -> bool:
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


def _shared_free_state_dict(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Drop aliases of tied tensors (safetensors refuses shared storage), keeping the name
    the model itself would keep (``_tied_weights_keys`` targets are dropped first)."""
    tied = set()
    keys = getattr(model, "_tied_weights_keys", None)
    if isinstance(keys, (dict, list, tuple, set)):
        tied = set(keys)
    seen: dict[tuple, str] = {}
    out = {}
    order = sorted(state, key=lambda k: (k in tied, k))
    for k in order:
        t = state[k]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) \
            if t.device.type != "meta" else (k,)
        if key in seen:
            continue
        seen[key] = k
        out[k] = t.detach().contiguous().cpu()
    return out


# ----------------------------------------------------------------------------- save


def _full_state_dicts(model, optimizer) -> tuple[dict, dict | None]:
    """Model and optimizer state dicts; under FSDP2 gathered in full (a collective)."""
    if _is_distributed_tensor_model(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim_sd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer else None
        return get_model_state_dict(model, options=opts), optim_sd
    return model.state_dict(), optimizer.state_dict() if optimizer is not None else None


def _write_atomically(root: Path, step: int, tensors: dict, state: dict, *,
                      run_id: str | None = None, save_extra=None) -> Path:
    """Write ``root/step-N/`` (weights, trainer state, manifest with sizes and sha256) into a
    temporary directory, fsync it, then rename it into place (``diskio.write_directory``); an
    existing checkpoint of the same step is moved aside first, so a valid checkpoint exists at
    every instant.  A failed write (disk full) raises ``WriteError`` naming the file and the
    bytes it needed; the temporary directory is removed."""
    from safetensors.torch import save_file

    def fill(tmp: Path) -> None:
        with writing(tmp / MODEL_FILE, tensor_bytes(tensors)):
            save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt", "step": str(step)})
        with writing(tmp / STATE_FILE, tensor_bytes(state)):
            torch.save(state, tmp / STATE_FILE)
        if save_extra is not None:  # e.g. config.json + tokenizer: the directory loads as --model
            with writing(tmp):
                save_extra(tmp)
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                fsync_file(p)
                files[p.relative_to(tmp).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
        manifest = {"format": FORMAT_VERSION, "step": step, "files": files,
                    "torch": torch.__version__, "time": time.time()}
        if run_id is not None:
            manifest["run_id"] = run_id
        mpath = tmp / MANIFEST_FILE
        with writing(mpath), open(mpath, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def verify(tmp: Path) -> None:
        try:
            check_safetensors(tmp / MODEL_FILE)
        except ValueError as e:
            raise WriteError(tmp / MODEL_FILE, tensor_bytes(tensors), e) from None

    return write_directory(root / _step_name(step), fill, verify)


def save_checkpoint(run_dir, step: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                    extra: dict | None = None, *, keep_last: int | None = None,
                    rng_states: list[dict] | None = None, write: bool = True,
                    allow_non_finite: bool = False, trainable_only: bool = False,
                    run_id: str | None = None, save_extra=None) -> Path | None:
    """Atomically write ``run_dir/checkpoints/step-{step:08d}/``; returns its path.

    Args:
        step: completed optimizer steps (the resumed loop starts at this step index).
        model: the unwrapped model (a DDP wrapper is unwrapped; FSDP2 is gathered).
        optimizer, scheduler: anything with ``state_dict()`` / ``load_state_dict()``, or None.
        extra: picklable training state (data position, config, ...); ``extra["step"]`` is set.
        keep_last: when given, ``prune(run_dir, keep_last)`` runs after the save.
        rng_states: per-rank RNG states (``distributed.gather_rng_states()``); default: this
            process's ``capture_rng_state()``.
        write: False on non-zero ranks of an FSDP2 run (they join the gathering only).
        allow_non_finite: write even when a parameter is NaN/inf (default: refuse).
        trainable_only: store only the parameters that require grad (LoRA: the adapters; the
            frozen base is the run's ``--model`` again at resume).
        run_id: the run's identity, recorded in the manifest; pruning then touches only the
            checkpoints of that run.
        save_extra: ``f(directory)`` writing more files into the checkpoint (listed in the
            manifest), e.g. the model config and tokenizer so it loads as a model directory.

    An existing checkpoint of the same step is replaced (the old one is moved aside first,
    so a valid checkpoint exists at every instant).
    """
    step = int(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    model = unwrap_model(model)
    model_sd, optim_sd = _full_state_dicts(model, optimizer)
    if not write:
        return None
    if trainable_only:
        trainable = {n for n, p in model.named_parameters(remove_duplicate=False)
                     if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    if not allow_non_finite:
        for k, t in model_sd.items():
            if t.is_floating_point() and not bool(torch.isfinite(_local(t)).all()):
                raise NonFiniteLossError(
                    f"refusing to save checkpoint at step {step}: parameter {k!r} is not finite "
                    f"(the last valid checkpoint stays the newest)", step=step)
    state = {
        "format": FORMAT_VERSION,
        "step": step,
        "optimizer": optim_sd,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng_states if rng_states is not None else [capture_rng_state()],
        "trainable_only": trainable_only,
        "extra": {**(extra or {}), "step": step},
        "time": time.time(),
    }
    final = _write_atomically(_ckpt_root(run_dir), step, _shared_free_state_dict(model_sd, model),
                              state, run_id=run_id, save_extra=save_extra)
    log.info("saved checkpoint %s", final)
    if keep_last is not None:
        prune(run_dir, keep_last, run_id=run_id, keep=(final,))
    return final


def checkpoint_run_id(path) -> str | None:
    """The run identity recorded in a checkpoint's manifest (None: not recorded)."""
    try:
        return json.loads((Path(path) / MANIFEST_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


# ----------------------------------------------------------------------------- find / verify


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-*`` directory under ``run_dir/checkpoints``, newest first
    (not verified)."""
    root = _ckpt_root(run_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, key=lambda x: -x[0])


def verify_checkpoint(path, *, check_hash: bool = True) -> tuple[bool, str]:
    """``(ok, reason)``: the manifest exists, parses, and every file has its recorded size
    (and sha256 when ``check_hash``)."""
    path = Path(path)
    if not path.is_dir():
        return False, "not a directory"
    mpath = path / MANIFEST_FILE
    if not mpath.is_file():
        return False, f"no {MANIFEST_FILE} (partial checkpoint: the writer was interrupted)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        return False, f"unreadable {MANIFEST_FILE}: {e}"
    m = _STEP_RE.match(path.name)
    if m and int(m.group(1)) != int(manifest.get("step", -1)):
        return False, f"manifest step {manifest.get('step')} does not match the directory name"
    for name in (MODEL_FILE, STATE_FILE):
        if name not in files:
            return False, f"manifest does not list {name}"
    for name, info in files.items():
        p = path / name
        if not p.is_file():
            return False, f"missing file {name}"
        size = p.stat().st_size
        if size != info["size"]:
            return False, f"{name} has {size} bytes, manifest says {info['size']} (truncated?)"
        if check_hash and _sha256(p) != info["sha256"]:
            return False, f"{name} sha256 mismatch (corrupt)"
    return True, "ok"


def _report(path: Path, reason: str) -> None:
    msg = f"skipping checkpoint {path}: {reason}"
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def find_latest_valid(run_dir, *, check_hash: bool = True) -> Path | None:
    """The newest checkpoint under ``run_dir/checkpoints`` that passes ``verify_checkpoint``;
    corrupt or partial ones are reported (warning naming path and reason) and skipped;
    leftover ``.tmp-*`` directories are ignored.  None when there is none."""
    for _, path in list_checkpoints(run_dir):
        ok, reason = verify_checkpoint(path, check_hash=check_hash)
        if ok:
            return path
        _report(path, reason)
    return None


def resolve_resume(resume: str | os.PathLike | None, run_dir) -> Path | None:
    """Turn a ``--resume`` value into a checkpoint directory (or None: start fresh).

    ``""``/None: no resume.  ``"auto"``: newest valid checkpoint of ``run_dir`` (None if there
    is none, so a first run and its restarts share one command line).  A checkpoint directory:
    that one, verified (``CheckpointError`` if invalid).  A run directory (holding
    ``checkpoints/``): its newest valid checkpoint (``CheckpointError`` if none).
    """
    if resume is None or str(resume) == "":
        return None
    if str(resume) == "auto":
        return find_latest_valid(run_dir)
    p = Path(resume)
    if (p / MANIFEST_FILE).exists() or _STEP_RE.match(p.name):
        ok, reason = verify_checkpoint(p)
        if not ok:
            raise CheckpointError(f"--resume {p}: invalid checkpoint: {reason}")
        return p
    if (p / CHECKPOINT_DIR).is_dir():
        found = find_latest_valid(p)
        if found is None:
            raise CheckpointError(f"--resume {p}: no valid checkpoint under {p / CHECKPOINT_DIR}")
        return found
    raise CheckpointError(f"--resume {p}: not a checkpoint directory nor a run directory "
                          f"with {CHECKPOINT_DIR}/")


# ----------------------------------------------------------------------------- load


def load_checkpoint(path, model: torch.nn.Module, optimizer=None, scheduler=None, *,
                    rank: int = 0, restore_rng: bool = True, verify: bool = True,
                    map_location="cpu") -> dict:
    """Load weights, optimizer, scheduler and (by default) RNG states; return ``extra``.

    ``rank`` picks this process's RNG state when the checkpoint holds one per rank.  A
    checkpoint saved with ``trainable_only`` restores those parameters and keeps the frozen
    ones.  The file ``trainer_state.pt`` is unpickled (``weights_only=False``): load only
    checkpoints you wrote.
    """
    path = Path(path)
    if verify:
        ok, reason = verify_checkpoint(path)
        if not ok:
            raise CheckpointError(f"cannot load checkpoint {path}: {reason}")
    from safetensors.torch import load_file

    model = unwrap_model(model)
    tensors = load_file(str(path / MODEL_FILE))
    state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=False)
    _check_shapes(path, tensors, model, dict(state.get("extra") or {}))
    if _is_distributed_tensor_model(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )
        opts = StateDictOptions(full_state_dict=True, strict=False)
        full = _fill_tied(tensors, model)
        set_model_state_dict(model, full, options=opts)
        if optimizer is not None and state.get("optimizer") is not None:
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    else:
        full = _fill_tied(tensors, model)
        missing, unexpected = model.load_state_dict(full, strict=False)
        if state.get("trainable_only"):  # the frozen parameters are the model's own
            frozen = {n for n, p in model.named_parameters(remove_duplicate=False)
                      if not p.requires_grad}
            missing = [k for k in missing if k not in frozen]
        if unexpected or missing:
            raise CheckpointError(f"checkpoint {path} does not match the model: missing "
                                  f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        if optimizer is not None:
            if state.get("optimizer") is None:
                raise CheckpointError(f"checkpoint {path} holds no optimizer state")
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        if state.get("scheduler") is None:
            raise CheckpointError(f"checkpoint {path} holds no scheduler state")
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and state.get("rng"):
        rngs = state["rng"]
        if rank >= len(rngs):
            warnings.warn(f"checkpoint {path} has RNG states for {len(rngs)} rank(s); rank "
                          f"{rank} reuses rank 0's", RuntimeWarning, stacklevel=2)
            rank = 0
        restore_rng_state(rngs[rank])
    extra = dict(state.get("extra") or {})
    extra.setdefault("step", int(state["step"]))
    log.info("loaded checkpoint %s (step %d)", path, extra["step"])
    return extra


def _check_shapes(path: Path, tensors: dict, model, extra: dict) -> None:
    """Every stored tensor has the shape of the model's; else ``CheckpointMismatchError``
    naming the parameter and both shapes (before any tensor is copied)."""
    live = model.state_dict()
    for k, t in tensors.items():
        if k in live and tuple(live[k].shape) != tuple(t.shape):
            raise CheckpointMismatchError(
                f"checkpoint {path} does not fit the model: parameter {k!r} has shape "
                f"{list(t.shape)} in the checkpoint and {list(live[k].shape)} in the model",
                extra)


def _fill_tied(tensors: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """Add back keys dropped as aliases of tied tensors (same storage in the live model)."""
    live = model.state_dict()
    missing = [k for k in live if k not in tensors]
    if not missing:
        return tensors
    by_storage: dict[tuple, str] = {}
    for k, t in live.items():
        if k in tensors:
            by_storage.setdefault((_local(t).untyped_storage().data_ptr(), tuple(t.shape)), k)
    out = dict(tensors)
    for k in missing:
        t = live[k]
        src = by_storage.get((_local(t).untyped_storage().data_ptr(), tuple(t.shape)))
        if src is not None:
            out[k] = tensors[src]
    return out


# ----------------------------------------------------------------------------- prune


def prune(run_dir, keep_last: int, *, run_id: str | None = None, keep=()) -> list[Path]:
    """Delete all but the ``keep_last`` newest (highest-step) checkpoints and any leftover
    ``.tmp-*`` / ``.old-*`` directories of dead writers; returns what was removed.

    The newest *valid* checkpoint (size check) is always kept, even when newer ones are
    corrupt, so pruning never leaves a run without a usable checkpoint; so are the paths in
    ``keep`` (the one just written).  With ``run_id``, only checkpoints whose manifest records
    that run identity are considered: another run's checkpoints are never deleted, nor can
    they (by having higher steps) push this run's newest one out.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    removed = []
    ckpts = list_checkpoints(run_dir)
    if run_id is not None:
        ckpts = [(s, p) for s, p in ckpts if checkpoint_run_id(p) == run_id]
    keep = {Path(p) for p in keep} | {p for _, p in ckpts[:keep_last]}
    for _, p in ckpts:
        if verify_checkpoint(p, check_hash=False)[0]:
            keep.add(p)
            break
    for _, p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    root = _ckpt_root(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
                pid = p.name.rsplit("-", 1)[-1]
                if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
                    continue  # another live writer
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed
