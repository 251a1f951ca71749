"""What a run writes as it goes: ``metrics.jsonl``, ``samples.jsonl``, the progress bar.

Rank 0 alone writes.  On resume, lines of steps after the checkpoint (a killed run may have
logged a step after its last checkpoint) are dropped before appending.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

__all__ = ["RunLog", "Progress", "peak_memory_mb", "restore_log", "to_json"]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def to_json(metrics: dict) -> str:
    return json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})


def restore_log(path: Path, start: int) -> list[dict]:
    """Keep the lines of a JSONL log with ``step <= start``; returns them parsed."""
    if not path.is_file():
        return []
    kept, rows = [], []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= start:
            kept.append(line)
            rows.append(row)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(x + "\n" for x in kept))
    tmp.replace(path)
    return rows


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

    def __init__(self, out_dir: Path, start: int, enabled: bool):
        self.history: list[dict] = []
        self.enabled = enabled
        self.metrics_f = self.samples_f = None
        if not enabled:
            return
        if start > 0:
            self.history = restore_log(out_dir / "metrics.jsonl", start)
            restore_log(out_dir / "samples.jsonl", start)
        mode = "a" if start > 0 else "w"
        self.metrics_f = (out_dir / "metrics.jsonl").open(mode)
        self.samples_f = (out_dir / "samples.jsonl").open(mode)

    def metrics(self, m: dict) -> None:
        if not self.enabled:
            return
        line = to_json(m)
        self.metrics_f.write(line + "\n")
        self.metrics_f.flush()
        print(line, flush=True)
        self.history.append(m)

    def sample(self, row: dict) -> None:
        if self.enabled:
            self.samples_f.write(json.dumps(row) + "\n")
            self.samples_f.flush()

    def close(self) -> None:
        for f in (self.metrics_f, self.samples_f):
            if f is not None:
                f.close()
