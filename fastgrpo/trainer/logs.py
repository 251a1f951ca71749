"""What a run writes as it goes: ``metrics.jsonl``, ``samples.jsonl``, the progress bar, and
the ``--report-to`` loggers (tensorboard into ``<out>/tb``, wandb into ``<out>/wandb``).

Rank 0 alone writes.  On resume, lines of steps after the checkpoint (a killed run may have
logged a step after its last checkpoint) are dropped before appending.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

from fastgrpo.trainer.config import ConfigError, report_targets
from fastgrpo.trainer.diskio import writing

__all__ = ["RunLog", "Progress", "peak_memory_mb", "restore_log", "to_json", "json_safe", "step_line"]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def json_safe(obj):
    """``obj`` with every NaN/inf float replaced by None (JSON null), at full precision."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def to_json(metrics: dict) -> str:
    """One strict-JSON line: floats at full precision, NaN/inf as null."""
    return json.dumps(json_safe(metrics), allow_nan=False)


def step_line(m: dict, total: int) -> str:
    """The short human line a step prints on stdout (the full record is in metrics.jsonl)."""
    def f(k, fmt):
        v = m.get(k)
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)
    return (f"step {m['step']}/{total}  reward {f('reward/mean', '.3f')}  acc {f('accuracy', '.2f')}  "
            f"kept {f('kept_frac', '.2f')}  loss {f('loss', '.4f')}  kl {f('kl', '.4f')}")


def restore_log(path: Path, start: int) -> list[dict]:
    """Keep the lines of a JSONL log with ``step <= start``; returns them parsed."""
    if not path.is_file():
        return []
    kept, rows = [], []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start:
            kept.append(line)
            rows.append(row)
    tmp = path.with_name(path.name + ".tmp")
    data = "".join(x + "\n" for x in kept)
    try:
        with writing(path, len(data.encode())):
            tmp.write_text(data)
            tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows


def append_line(f, line: str) -> None:
    """Append ``line`` + newline to the unbuffered binary file ``f`` in full, or not at all: a
    failed write (disk full) is cut off again and raises ``WriteError`` naming the file."""
    data = memoryview((line + "\n").encode())
    pos = f.tell()
    try:
        with writing(f.name, len(data)):
            while data:
                data = data[f.write(data):]
    except BaseException:
        try:
            os.ftruncate(f.fileno(), pos)
            f.seek(pos)
        except OSError:
            pass
        raise


class Progress:
    """A tqdm bar on stderr (a plain ``step i/n`` line without tqdm), or nothing."""

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self.bar = None
        self.enabled = enabled
        self.total = total
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, file=sys.stderr, dynamic_ncols=True,
                                desc="stepgrpo")
            except ImportError:
                pass

    def update(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif self.enabled:
            print(f"\rstep {step + 1}/{self.total} {text}", end="", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(("\n" if self.enabled else "") + text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


class RunLog:
    """``metrics.jsonl`` and ``samples.jsonl`` of a run directory (rank 0), and its history.

    ``start > 0`` (a resumed run) keeps the logged steps up to ``start`` and appends."""

    def __init__(self, out_dir: Path, start: int, enabled: bool, *, total: int = 0,
                 report_to: str = "none", stdout: bool = True, config: dict | None = None):
        self.history: list[dict] = []
        self.enabled = enabled
        self.total, self.stdout = total, stdout
        self.metrics_f = self.samples_f = self.tb = self.wandb = None
        if not enabled:
            return
        if start > 0:
            self.history = [{k: math.nan if v is None else v for k, v in row.items()}  # null: NaN
                            for row in restore_log(out_dir / "metrics.jsonl", start)]
            restore_log(out_dir / "samples.jsonl", start)
        mode = "a" if start > 0 else "w"
        for name in ("metrics.jsonl", "samples.jsonl"):  # unbuffered: a line is on disk or absent
            with writing(out_dir / name):
                setattr(self, name.split(".")[0] + "_f", open(out_dir / name, mode + "b", buffering=0))
        targets = report_targets(report_to)
        if "tensorboard" in targets:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(f"--report-to tensorboard needs the tensorboard package "
                                  f"(pip install 'fastgrpo[tensorboard]'): {e}") from None
            self.tb = SummaryWriter(log_dir=str(out_dir / "tb"), purge_step=start + 1 if start else None)
        if "wandb" in targets:
            self.wandb = _wandb_run(out_dir, config or {})

    def metrics(self, m: dict) -> None:
        if not self.enabled:
            return
        append_line(self.metrics_f, to_json(m))
        if self.stdout:
            print(step_line(m, self.total), flush=True)
        scalars = {k: v for k, v in m.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        try:
            if self.tb is not None:
                for k, v in scalars.items():
                    self.tb.add_scalar(k, v, m["step"])
                self.tb.flush()
        except Exception as e:  # noqa: BLE001 - a logger never stops the run (metrics.jsonl has it)
            self.tb = self._logger_failed("tensorboard", e)
        try:
            if self.wandb is not None:
                self.wandb.log(scalars, step=m["step"])
        except Exception as e:  # noqa: BLE001
            self.wandb = self._logger_failed("wandb", e)
        self.history.append(m)

    @staticmethod
    def _logger_failed(name: str, e: Exception) -> None:
        print(f"warning: --report-to {name} failed ({type(e).__name__}: {e}); it is switched off "
              f"for the rest of the run (metrics.jsonl has every step)", file=sys.stderr)
        return None

    def sample(self, row: dict) -> None:
        if self.enabled:
            append_line(self.samples_f, to_json(row))

    def close(self, exit_code: int = 0) -> None:
        """Close the files and loggers; ``exit_code`` != 0 marks the wandb run as failed."""
        for f in (self.metrics_f, self.samples_f, self.tb):
            if f is not None:
                f.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=exit_code)
            self.wandb = None


def _wandb_run(out_dir: Path, config: dict):
    """A wandb run writing into ``<out_dir>/wandb``: offline (no account, nothing sent; ``wandb
    sync`` uploads it later) unless the user set ``WANDB_MODE``.  Project ``fastgrpo`` and the
    run name ``out_dir``'s name, unless ``WANDB_PROJECT`` / ``WANDB_NAME`` say otherwise.  A
    resumed run is a new wandb run whose steps continue the checkpoint's."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(f"--report-to wandb needs the wandb package "
                          f"(pip install 'fastgrpo[wandb]'): {e}") from None
    mode = os.environ.get("WANDB_MODE", "offline")
    # the process-wide settings too: wandb's own usage telemetry follows those, not init's mode
    wandb.setup(settings=wandb.Settings(mode=mode))
    try:
        return wandb.init(dir=str(out_dir), mode=mode,
                          project=os.environ.get("WANDB_PROJECT", "fastgrpo"),
                          name=os.environ.get("WANDB_NAME", out_dir.name), config=config)
    except wandb.errors.Error as e:  # e.g. WANDB_MODE=online without an account
        raise ConfigError(f"--report-to wandb (WANDB_MODE={mode}): {e}") from None
