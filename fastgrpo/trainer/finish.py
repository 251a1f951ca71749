"""A run's finish, in order of importance: the trained model (written like a checkpoint and
verified), the final held-out eval, ``summary.json``, the plot and the report (``finish_run``)."""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

from fastgrpo.trainer import distributed as dist_
from fastgrpo.trainer.checkpoint import CheckpointError, find_latest_valid
from fastgrpo.trainer.config import TrainConfig
from fastgrpo.trainer.diskio import (WriteError, check_safetensors, tensor_bytes, write_directory,
                                     write_file, writing)
from fastgrpo.trainer.logs import json_safe
from fastgrpo.trainer.plot import plot_curves
from fastgrpo.trainer.policy import save_lora
from fastgrpo.trainer.signals import RunSignals, StopPhase, TrainingInterrupted
from fastgrpo.trainer.state import RunState

__all__ = ["finish_run", "save_model", "verify_model_dir", "warn_piece", "resume_hint", "full_state_dict"]


def full_state_dict(model) -> dict | None:
    """FSDP2 (DTensor parameters): the gathered full state dict (a collective); else None."""
    if not any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def warn_piece(piece: str, e: BaseException, r: RunState) -> None:
    """A failed optional piece of the run's finish: a warning naming it, never a lost run."""
    saved = r.out_dir / "model"
    safe = f"; the trained model is in {saved}" if r.cfg.save and saved.is_dir() else ""
    print(f"warning: could not write {piece} ({type(e).__name__}: {e}){safe}", file=sys.stderr)


def verify_model_dir(directory: Path) -> None:
    """A written model directory is complete: config.json parses, every safetensors file holds
    the data its header announces, and there are weights (else ``WriteError``)."""
    for f in [directory / "config.json", *sorted(directory.rglob("*.safetensors"))]:
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            else:
                check_safetensors(f)
        except (OSError, ValueError) as e:
            raise WriteError(f, None, e) from None
    if not any(directory.glob("*.safetensors")) and not any(directory.glob("pytorch_model*.bin")):
        raise WriteError(directory / "model.safetensors", None, ValueError("no weights written"))


def save_model(r: RunState, full_sd: dict | None) -> Path:
    """``<out>/model``: the trained model, its tokenizer (and image processor) written like a
    checkpoint: into a temporary directory, verified, renamed, so it is complete or absent."""
    cfg = r.cfg
    needed = tensor_bytes(full_sd if full_sd is not None else r.model.state_dict())

    def fill(tmp: Path) -> None:
        with writing(tmp / "model.safetensors", needed):
            if cfg.lora_r:  # the merged full model, and the adapter alone in model/adapter
                save_lora(r.model, tmp, full_sd)
            else:
                r.model.save_pretrained(tmp, **({} if full_sd is None else {"state_dict": full_sd}))
        with writing(tmp):
            r.tokenizer.save_pretrained(tmp)
            (tmp / "args.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
            if r.vision is not None:
                r.vision.save(tmp)

    return write_directory(r.out_dir / "model", fill, verify_model_dir)


def finish_run(r: RunState, history: list[dict], signals: RunSignals) -> dict:
    """The run's finish, in order of importance: the trained model (written and verified),
    the held-out eval after training, ``summary.json``, the plot and the report.  A failure
    of the last three is a warning naming it; a signal during the eval ends it (the model is
    saved by then) and the run exits 128 + signal after writing the summary."""
    cfg, before = r.cfg, r.before
    model_dir = r.out_dir / "model"
    full_sd = full_state_dict(r.model) if cfg.save else None  # FSDP2: collective
    error = None
    with signals.phase(f"writing the trained model to {model_dir} first; the run exits after "
                       f"it, without the final evaluation"):
        if r.main and cfg.save:
            try:
                save_model(r, full_sd)
            except WriteError as e:
                error = e
    if dist_.broadcast_object(error is not None):
        if error is not None:
            raise error
        raise CheckpointError("rank 0 could not write the trained model (its message says why)")
    del full_sd
    stopped = signals.stop_requested()
    after = None
    if stopped is None:
        kept = (f"the trained model is already in {model_dir}" if cfg.save else
                "nothing is saved (--no-save)")
        try:
            with signals.phase(f"stopping the final evaluation ({kept}); summary.json is "
                               f"written without eval_after, then the run exits", interrupt=True):
                after = r.evaluate()
        except StopPhase as e:
            stopped = e.signum
        if dist_.is_distributed():
            stopped = next((x for x in dist_.all_gather_objects(stopped) if x is not None), None)
    if not r.main:
        if stopped is not None:
            raise TrainingInterrupted("stopped by a signal during the final evaluation", stopped)
        return {}
    summary = {"eval_before": before, "eval_after": after, "steps": cfg.steps,
               "seconds": round(time.perf_counter() - r.t_start, 1),
               "last": history[-1] if history else {}}
    if r.start > 0:
        summary["resumed_from_step"] = r.start
    notes = []
    if stopped is not None:
        notes.append(f"eval_after is null: {signal.Signals(stopped).name} ended the run before "
                     f"its final evaluation finished")
    elif not r.eval_rows:
        notes.append("eval_before and eval_after are null: no held-out rows (a --train-file "
                     "without --eval-file has none)")
    safe = json_safe(summary)
    if json.dumps(safe) != json.dumps(summary, allow_nan=True):
        notes.append("null stands for a value that is not a finite number (NaN/inf), e.g. a "
                     "mean over no samples")
    if notes:
        safe["notes"] = notes
    try:
        write_file(r.out_dir / "summary.json", json.dumps(safe, indent=2, allow_nan=False).encode())
    except Exception as e:  # noqa: BLE001 - the model is saved: the summary must not undo that
        warn_piece("summary.json", e, r)
    if cfg.plot and history:
        try:
            plot_curves(history, before, after, r.out_dir / "curves.png")
        except Exception as e:  # noqa: BLE001 - a plot is decoration
            warn_piece("the curves plot (curves.png)", e, r)
    if stopped is not None:
        raise TrainingInterrupted(
            f"{signal.Signals(stopped).name}: stopped before the final evaluation finished, after "
            f"training all {cfg.steps} steps; " + (f"the trained model is in {model_dir}" if
                                                    cfg.save else "nothing saved (--no-save)"),
            stopped)
    try:
        print(f"{r.task.report(before, after, len(r.eval_rows))}\n"
              f"({summary['seconds']} s, outputs in {r.out_dir})")
    except Exception as e:  # noqa: BLE001
        warn_piece("the final report", e, r)
    return summary


def resume_hint(cfg: TrainConfig) -> str:
    """What is left after a failed write: the newest valid checkpoint and how to resume it."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        latest = find_latest_valid(cfg.out_dir)
    if latest is None:
        return ("The partial file was removed. No checkpoint was written before it (--save-every "
                "N writes them): free some space, then run again with --overwrite")
    step = int(latest.name.split("-")[-1])
    return (f"The partial file was removed; the newest checkpoint {latest} (step {step}) is "
            f"untouched: free some space (or give another --out-dir), then run the same command "
            f"plus --resume {latest}")
