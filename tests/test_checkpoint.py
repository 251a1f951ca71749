"""Checkpoint/resume: atomic writes, verification, pruning, RNG restore, SIGKILL mid-step."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgrpo.trainer.checkpoint import (
    MANIFEST_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    NonFiniteLossError,
    check_finite_loss,
    find_latest_valid,
    list_checkpoints,
    load_checkpoint,
    params_are_finite,
    prune,
    resolve_resume,
    save_checkpoint,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


class Tied(torch.nn.Module):
    """Embedding and output projection share one weight (like tied LMs)."""

    def __init__(self, v=11, d=6):
        super().__init__()
        self.emb = torch.nn.Embedding(v, d)
        self.mid = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, v, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.emb(x))))


def _train_some(model, opt, sched, steps=2):
    for _ in range(steps):
        x = torch.randint(0, 11, (4, 3))
        loss = model(x).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _make(seed=0):
    torch.manual_seed(seed)
    m = Tied()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return m, opt, sched


def test_roundtrip_restores_everything(tmp_path):
    m, opt, sched = _make()
    _train_some(m, opt, sched)
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path, 2, m, opt, sched, extra={"data_pos": 17})
    assert path == tmp_path / "checkpoints" / "step-00000002"
    assert {p.name for p in path.iterdir()} == {MODEL_FILE, STATE_FILE, MANIFEST_FILE}
    draws = (random.random(), np.random.rand(), torch.rand(3))
    # tied weight stored once
    from safetensors import safe_open
    with safe_open(path / MODEL_FILE, "pt") as f:
        assert len([k for k in f.keys() if k.endswith("weight") and f.get_slice(k).get_shape() == [11, 6]]) == 1

    m2, opt2, sched2 = _make(seed=1)
    random.seed(0)
    extra = load_checkpoint(path, m2, opt2, sched2)
    assert extra == {"data_pos": 17, "step": 2}
    assert m2.head.weight is m2.emb.weight  # still tied
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    assert draws[0] == random.random() and draws[1] == np.random.rand()
    assert torch.equal(draws[2], torch.rand(3))
    # both continue identically
    torch.manual_seed(9)
    _train_some(m, opt, sched, 1)
    torch.manual_seed(9)
    _train_some(m2, opt2, sched2, 1)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "bad_manifest"])
def test_corrupt_checkpoint_falls_back_with_warning(tmp_path, damage):
    m, opt, sched = _make()
    save_checkpoint(tmp_path, 1, m, opt, sched)
    _train_some(m, opt, sched, 1)
    bad = save_checkpoint(tmp_path, 2, m, opt, sched)
    if damage == "truncate":
        p = bad / MODEL_FILE
        p.write_bytes(p.read_bytes()[:-7])
    elif damage == "flip":
        p = bad / STATE_FILE
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))
    elif damage == "no_manifest":
        (bad / MANIFEST_FILE).unlink()
    else:
        (bad / MANIFEST_FILE).write_text("{not json")
    ok, reason = verify_checkpoint(bad)
    assert not ok and reason
    with pytest.warns(RuntimeWarning, match=r"step-00000002"):
        found = find_latest_valid(tmp_path)
    assert found == tmp_path / "checkpoints" / "step-00000001"
    with pytest.raises(CheckpointError, match="step-00000002"):
        resolve_resume(str(bad), tmp_path)
    with pytest.raises(CheckpointError, match="step-00000002"):
        load_checkpoint(bad, *_make())


def test_partial_tmp_dir_ignored_and_pruned(tmp_path):
    m, opt, sched = _make()
    save_checkpoint(tmp_path, 1, m, opt, sched)
    # a writer killed mid-save leaves only a temp dir (and maybe a manifest-less step dir)
    tmp = tmp_path / "checkpoints" / ".tmp-step-00000002-999999999"
    tmp.mkdir()
    (tmp / MODEL_FILE).write_bytes(b"partial")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert find_latest_valid(tmp_path).name == "step-00000001"
    assert resolve_resume("auto", tmp_path).name == "step-00000001"
    assert resolve_resume("", tmp_path) is None
    assert resolve_resume("auto", tmp_path / "elsewhere") is None
    assert resolve_resume(str(tmp_path), tmp_path / "x").name == "step-00000001"
    prune(tmp_path, keep_last=3)
    assert not tmp.exists()


def test_keep_last_and_same_step_replace(tmp_path):
    m, opt, sched = _make()
    for s in range(1, 6):
        save_checkpoint(tmp_path, s, m, opt, sched, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 4]
    # corrupt the newest two: pruning keeps the newest valid one too
    save_checkpoint(tmp_path, 6, m, opt, sched)
    for s in (5, 6):
        (tmp_path / "checkpoints" / f"step-{s:08d}" / MANIFEST_FILE).unlink()
    prune(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 5, 4]
    # re-saving a step replaces it atomically
    save_checkpoint(tmp_path, 6, m, opt, sched)
    assert verify_checkpoint(tmp_path / "checkpoints" / "step-00000006")[0]
    assert not any(p.name.startswith((".tmp", ".old")) for p in (tmp_path / "checkpoints").iterdir())


def test_non_finite_loss_names_step(tmp_path):
    check_finite_loss(torch.tensor(1.5), 3)
    check_finite_loss(2.0, 3)
    for bad in (torch.tensor(float("nan")), float("inf"), torch.tensor([1.0, float("-inf")])):
        with pytest.raises(NonFiniteLossError, match=r"at step 7") as ei:
            check_finite_loss(bad, 7)
        assert ei.value.step == 7
    m, opt, sched = _make()
    assert params_are_finite(m)
    with torch.no_grad():
        m.mid.weight[0, 0] = float("nan")
    assert not params_are_finite(m)
    with pytest.raises(NonFiniteLossError, match="mid.weight"):
        save_checkpoint(tmp_path, 1, m, opt, sched)
    assert find_latest_valid(tmp_path) is None


# ----------------------------------------------------------------------------- SIGKILL resume

TRAIN_SCRIPT = textwrap.dedent('''
    """Tiny deterministic trainer: save_every=1, optional SIGKILL mid-step or mid-save."""
    import json, os, random, signal, sys
    import numpy as np
    import torch
    from fastgrpo.trainer import checkpoint as ck

    run_dir, steps = sys.argv[1], int(sys.argv[2])
    kill_at = int(sys.argv[3])          # -1: never
    kill_where = sys.argv[4]            # "step" (after backward) | "save" (before the rename)
    resume = sys.argv[5] if len(sys.argv) > 5 else ""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(0); np.random.seed(0); torch.manual_seed(0)

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                                torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s))
    data_gen = torch.Generator().manual_seed(1234)   # the data stream; its state = data position
    start = 0
    path = ck.resolve_resume(resume, run_dir)
    if path is not None:
        extra = ck.load_checkpoint(path, model, opt, sched)
        start = extra["step"]
        data_gen.set_state(extra["data_gen"])
    if kill_where == "save":
        real_replace = os.replace
        def replace(src, dst):
            if str(src).endswith(f"step-{kill_at:08d}-{os.getpid()}"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        os.replace = replace
    log = open(os.path.join(run_dir, "losses.jsonl"), "a")
    for step in range(start, steps):
        x = torch.randn(16, 8, generator=data_gen)
        y = x.sum(1, keepdim=True) + 0.1 * torch.randn(16, 1)       # global torch RNG
        noise = random.random() * 1e-3 + float(np.random.rand()) * 1e-3  # python + numpy RNG
        loss = ((model(x) - y) ** 2).mean() + noise
        opt.zero_grad()
        loss.backward()
        if step == kill_at and kill_where == "step":
            os.kill(os.getpid(), signal.SIGKILL)      # dies mid-step, before the update
        ck.check_finite_loss(loss, step + 1)
        opt.step()
        sched.step()
        log.write(json.dumps({"step": step + 1, "loss": loss.item().hex()}) + "\\n")
        log.flush()
        ck.save_checkpoint(run_dir, step + 1, model, opt, sched,
                           extra={"data_gen": data_gen.get_state()}, keep_last=2)
    torch.save(model.state_dict(), os.path.join(run_dir, "final.pt"))
''')


def _run(script, run_dir, steps, kill_at=-1, where="step", resume=""):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(script), str(run_dir), str(steps), str(kill_at),
                           where, resume], env=env, capture_output=True, text=True, timeout=120)


def _losses(run_dir):
    out = {}
    for line in (Path(run_dir) / "losses.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]  # a resumed run rewrites the steps it repeats; keep the last
    return out


@pytest.mark.parametrize("where", ["step", "save"])
def test_sigkill_mid_step_resume_is_bit_exact(tmp_path, where):
    script = tmp_path / "train_tiny.py"
    script.write_text(TRAIN_SCRIPT)
    steps, k = 7, 3
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    r = _run(script, ref_dir, steps)
    assert r.returncode == 0, r.stderr
    r = _run(script, run_dir, steps, kill_at=k, where=where)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert not (run_dir / "final.pt").exists()
    ckpts = [s for s, _ in list_checkpoints(run_dir)]
    if where == "step":   # killed during step k+1 (index k): checkpoints up to k exist
        assert ckpts[0] == k
    else:                 # killed while saving step k: only a temp dir for it exists
        assert ckpts[0] == k - 1
        assert any(p.name.startswith(f".tmp-step-{k:08d}") for p in (run_dir / "checkpoints").iterdir())
    r = _run(script, run_dir, steps, resume="auto")
    assert r.returncode == 0, r.stderr
    ref, got = _losses(ref_dir), _losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    for s in range(1, steps + 1):   # steps k+1.. (incl. k..k+2) identical bit for bit
        assert got[s] == ref[s], f"step {s}: {float.fromhex(got[s])} != {float.fromhex(ref[s])}"
    a = torch.load(ref_dir / "final.pt")
    b = torch.load(run_dir / "final.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [s for s, _ in list_checkpoints(run_dir)] == [steps, steps - 1]
    assert not any(p.name.startswith(".tmp") for p in (run_dir / "checkpoints").iterdir())
