"""Trainer checkpoints: SIGKILL mid-step + ``--resume auto`` reproduces the uninterrupted run,
a corrupt newest checkpoint falls back to the previous one, a NaN stops the run naming the step.

Runs the shipped warm-up model (real rewards, so every step changes the weights) on a few
prompts; deterministic on CPU with one thread and a fixed seed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo.trainer.checkpoint import STATE_FILE, verify_checkpoint
from fastgrpo.trainer.loop import main

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--steps", "4", "--save-every", "1", "--prompts-per-step", "3", "--group-size", "3",
        "--eval-size", "2", "--eval-every", "2", "--sample-every", "1", "--micro-batch-tokens", "200",
        "--threads", "1", "--device", "cpu", "--no-plot", "--no-progress"]
TIMING = {"gen_tokens_per_s", "train_tokens_per_s", "gen_seconds", "train_seconds", "peak_mem_mb"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fastgrpo.train", *ARGS, "--out-dir", str(out), *extra]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    return env


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_metrics(a: dict, b: dict) -> None:
    diff = {k: (a[k], b.get(k)) for k in a if k not in TIMING and a[k] != b.get(k)}
    assert not diff, f"step {a['step']}: {diff}"


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """Run A: 4 steps, a checkpoint after each (keep_last 3 -> steps 2, 3, 4 stay)."""
    out = tmp_path_factory.mktemp("resume") / "A"
    r = subprocess.run(_cmd(out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["step-00000002", "step-00000003", "step-00000004"]
    return out


def test_sigkill_mid_step_then_resume_matches_uninterrupted(uninterrupted, tmp_path):
    out = tmp_path / "B"
    ckpt2 = out / "checkpoints" / "step-00000002"
    with open(tmp_path / "B.out", "w") as so, open(tmp_path / "B.err", "w") as se:
        proc = subprocess.Popen(_cmd(out), cwd=REPO, env=_env(), stdout=so, stderr=se)
        deadline = time.monotonic() + 300
        while not ckpt2.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)  # step 3 is under way
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "B.err").read_text()[-3000:]
    done = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert 2 in done and max(done) < 4, done

    r = subprocess.run(_cmd(out, "--resume", "auto"), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from checkpoint {out / 'checkpoints' / f'step-{max(done):08d}'}" in r.stderr
    assert "eval before" not in r.stderr  # skipped on resume, the numbers come from the checkpoint

    a, b = _metrics(uninterrupted), _metrics(out)
    assert [m["step"] for m in b] == [1, 2, 3, 4]  # no duplicate of the step the kill cut short
    for ma, mb in zip(a, b):
        _same_metrics(ma, mb)
    _same_weights(uninterrupted, out)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (uninterrupted, out))
    assert sa["eval_before"] == sb["eval_before"] and sa["eval_after"] == sb["eval_after"]
    assert sb["resumed_from_step"] == max(done)
    assert (uninterrupted / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()


def test_corrupt_latest_checkpoint_falls_back_to_previous(uninterrupted, tmp_path):
    out = tmp_path / "C"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "model")
    latest = out / "checkpoints" / "step-00000004"
    f = latest / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    # a fresh process, as the uninterrupted run (bit-equal numbers are compared: in the test
    # process, state other tests left behind once moved step 4's entropy in the 8th digit)
    r = subprocess.run(_cmd(out, "--resume", "auto"), cwd=REPO, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr
    assert re.search(r"skipping checkpoint .*step-00000004: .*sha256 mismatch", err), err[-3000:]
    assert f"resuming from checkpoint {out / 'checkpoints' / 'step-00000003'} (step 3 of 4)" in err
    # step 4 re-run from checkpoint 3 gives the uninterrupted run's numbers and weights
    a, c = _metrics(uninterrupted), _metrics(out)
    assert [m["step"] for m in c] == [1, 2, 3, 4]
    _same_metrics(a[3], c[3])
    _same_weights(uninterrupted, out)


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path, capsys):
    # a far too large learning rate: step 1's update leaves finite but huge weights whose
    # gradient at step 2 is NaN (no periodic checkpoints: the stop writes one itself)
    out = tmp_path / "N"
    with pytest.raises(SystemExit) as e:
        main(["--steps", "4", "--prompts-per-step", "3", "--group-size", "3", "--eval-size", "1",
              "--micro-batch-tokens", "200", "--no-plot", "--no-progress", "--device", "cpu",
              "--lr", "1e3", "--warmup-steps", "0", "--no-drop-zero-std-groups", "--no-mask-truncated",
              "--out-dir", str(out)])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "error: non-finite gradient norm (nan) at step 2" in err
    assert [m["step"] for m in _metrics(out)] == [1]
    ckpt = out / "checkpoints" / "step-00000001"
    assert verify_checkpoint(ckpt)[0]
    assert f"saved the last completed step (1) to {ckpt}" in err
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    assert "at step 2" in state["extra"]["stopped"]
    assert not (out / "model").exists()
