"""Issue 17: a run owns its out-dir, resumes only its own checkpoints, fails early and cleanly,
stops cleanly on signals and logs honestly.  Short in-process runs of the shipped warm-up model
(or a tiny random one) on CPU."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo.tasks.arithmetic import make_splits
from fastgrpo.tasks.data import DataError, load_jsonl, write_jsonl
from fastgrpo.trainer.checkpoint import list_checkpoints, prune, save_checkpoint
from fastgrpo.trainer.config import ConfigError, parse_args
from fastgrpo.trainer.logs import to_json
from fastgrpo.trainer.loop import main, run
from fastgrpo.trainer.outdir import OutDirLock
from fastgrpo.trainer.prompts import PromptOrder

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
        "--eval-size", "1", "--eval-every", "0", "--sample-every", "0", "--no-plot", "--no-progress",
        "--device", "cpu", "--threads", "1"]


def cli(fn, capsys, *argv) -> tuple[int, str, str]:
    """A command's ``fn(argv)``: exit code (0 when it returns), stdout, stderr."""
    code = 0
    try:
        fn(list(argv))
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _main(capsys, *argv) -> tuple[int, str, str]:
    """``python -m fastgrpo.train`` with the fast options: exit code, stdout, stderr."""
    return cli(main, capsys, *FAST, *argv)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _train_file(tmp_path, n=4, **extra) -> Path:
    rows = make_splits(seed=3, n_train=n, n_eval=1)[0]
    for r in rows:
        r.update(extra)
    write_jsonl(rows, tmp_path / "train.jsonl")
    return tmp_path / "train.jsonl"


def _reward_file(tmp_path, body: str, name="rw.py") -> str:
    (tmp_path / name).write_text(body)
    return str(tmp_path / name)


# ----------------------------------------------------------------------------- out-dir ownership


def test_lock_refuses_a_second_run_and_takes_over_a_dead_owners_lock(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    with OutDirLock(out):  # a live owner (this process)
        code, _, err = _main(capsys, "--out-dir", str(out))
    assert code == 2
    assert f"is in use by another run (pid {os.getpid()}" in err
    (out / ".lock").write_text("999999999\n")  # a dead owner's file: no lock held on it
    code, _, err = _main(capsys, "--out-dir", str(out))
    assert code == 0, err


def test_fresh_run_refuses_an_earlier_run_unless_overwrite_or_resume(tmp_path, capsys):
    out = tmp_path / "o"
    assert _main(capsys, "--out-dir", str(out), "--save-every", "1")[0] == 0
    before = (out / "metrics.jsonl").read_text()
    code, _, err = _main(capsys, "--out-dir", str(out))
    assert code == 2 and "holds an earlier run (metrics.jsonl" in err and "--overwrite" in err
    assert (out / "metrics.jsonl").read_text() == before
    # --overwrite deletes the old outputs (its checkpoints too) and starts over
    code, _, err = _main(capsys, "--out-dir", str(out), "--overwrite", "--seed", "1")
    assert code == 0, err
    assert not (out / "checkpoints").exists() and len(_metrics(out)) == 1
    assert _main(capsys, "--out-dir", str(out), "--overwrite", "--resume", "auto")[0] == 2


def test_resume_auto_with_every_manifest_deleted_refuses(tmp_path, capsys):
    out = tmp_path / "o"
    assert _main(capsys, "--out-dir", str(out), "--save-every", "1")[0] == 0
    before = (out / "metrics.jsonl").read_text()
    for m in out.glob("checkpoints/*/manifest.json"):
        m.unlink()
    with pytest.warns(RuntimeWarning, match="no manifest.json"):
        code, _, err = _main(capsys, "--out-dir", str(out), "--resume", "auto", "--steps", "2")
    assert code == 2 and "but no valid checkpoint" in err, err
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_refuses_another_runs_checkpoint_unless_forced(tmp_path, capsys):
    out = tmp_path / "o"
    assert _main(capsys, "--out-dir", str(out), "--save-every", "1")[0] == 0
    code, _, err = _main(capsys, "--out-dir", str(out), "--resume", "auto", "--seed", "7")
    assert code == 2 and "is of another run" in err and "--seed 0 -> 7" in err and "--resume-force" in err
    # runtime options (out-dir, save-every, progress, ...) do not change the identity
    code, _, err = _main(capsys, "--out-dir", str(out), "--resume", "auto", "--save-every", "5")
    assert code == 0 and "resuming from checkpoint" in err, err
    code, _, err = _main(capsys, "--out-dir", str(out), "--resume", "auto", "--seed", "7",
                         "--resume-force", "--steps", "2")
    assert code == 0 and "continuing under the new options" in err, err
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    # a config saved before an option existed counts as having had its default
    import dataclasses
    from fastgrpo.trainer.identity import identity_fields as _identity_fields, run_identity
    now = dataclasses.asdict(parse_args(["--seed", "3"]))
    older = {k: v for k, v in now.items() if k != "entropy_coef"}
    assert _identity_fields(older) == _identity_fields(now) and run_identity(older) == run_identity(now)


def test_prune_keeps_the_current_runs_newest_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in (10, 11, 12):  # another run's checkpoints, at higher steps
        save_checkpoint(tmp_path, step, model, run_id="old")
    save_checkpoint(tmp_path, 2, model, keep_last=1, run_id="new")
    save_checkpoint(tmp_path, 3, model, keep_last=1, run_id="new")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [12, 11, 10, 3]
    # without run ids: the step just written stays even when higher steps exist
    prune(tmp_path, 1, keep=(tmp_path / "checkpoints" / "step-00000003",))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [12, 3]


def test_checkpoint_directory_loads_as_model(tmp_path, capsys):
    out = tmp_path / "o"
    assert _main(capsys, "--out-dir", str(out), "--save-every", "1", "--no-save")[0] == 0
    ckpt = out / "checkpoints" / "step-00000001"
    assert (ckpt / "config.json").is_file() and (ckpt / "tokenizer.json").is_file()
    from fastgrpo.trainer.policy import load_model
    model, tok = load_model(ckpt)
    saved = load_file(str(ckpt / "model.safetensors"))
    for k, v in saved.items():
        assert torch.equal(model.state_dict()[k], v), k
    code, _, err = _main(capsys, "--out-dir", str(tmp_path / "o2"), "--model", str(ckpt))
    assert code == 0, err


# ----------------------------------------------------------------------------- data


def test_reward_functions_get_every_column_and_none_for_missing_key_steps(tmp_path, capsys, monkeypatch):
    rows = make_splits(seed=3, n_train=4, n_eval=1)[0]
    for i, r in enumerate(rows):
        r["level"] = i
        if i % 2:
            del r["key_steps"]
    write_jsonl(rows, tmp_path / "train.jsonl")
    _reward_file(tmp_path, "SEEN = []\n"
                 "def record(prompts, completions, key_steps=None, level=None, **kw):\n"
                 "    SEEN.append((list(key_steps), list(level), sorted(kw)))\n"
                 "    return [0.0] * len(completions)\n", name="rec_rewards.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = _main(capsys, "--out-dir", str(tmp_path / "o"), "--train-file",
                         str(tmp_path / "train.jsonl"), "--prompts-per-step", "4",
                         "--reward", "rec_rewards:record")
    assert code == 0, err
    import rec_rewards
    (ks, level, other), = rec_rewards.SEEN
    for k, lv in zip(ks, level):
        assert (k is None) == (lv % 2 == 1)  # per row: None where the row has no key_steps
    assert "answer" in other and "solution" in other  # every other column too
    from fastgrpo.rewards import default_reward_set
    res = default_reward_set()(["p", "p"], ["x", "y"], answer=["1", "1"], key_steps=[[["a"]], None])
    assert res.stats()["step_k"]["count"] == 1  # None is excluded from the statistics


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "p", "answer": null}', "d.jsonl:2: field 'answer' must be a string or a number, got null"),
    ('{"prompt": "p", "answer": [1, 2]}', "d.jsonl:2: field 'answer' must be a string or a number, got [1, 2]"),
    ('{"prompt": "p", "answer": "1", "key_steps": [1, 2]}', "d.jsonl:2: field 'key_steps' must be a list"),
    ('{"prompt": 3, "answer": "1"}', "d.jsonl:2: field 'prompt' must be a string"),
])
def test_load_jsonl_rejects_bad_fields(tmp_path, line, message):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "ok", "answer": 4, "key_steps": ["a", ["b", "c"]]}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        load_jsonl(p)
    assert message in str(e.value)


def test_load_jsonl_names_a_non_utf8_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "ok", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_jsonl(p)


def test_prompt_longer_than_the_model_and_too_many_prompts_per_step(tmp_path, capsys):
    train = _train_file(tmp_path)
    from fastgrpo.trainer.policy import load_model
    model, tok = load_model()
    model.config.max_position_embeddings = 8
    cfg = parse_args([*FAST, "--out-dir", str(tmp_path / "o"), "--train-file", str(train)])
    with pytest.raises(DataError, match=r"train row 1 of .*train.jsonl: the prompt has \d+ tokens; "
                                        r"the model takes at most 8 positions"):
        run(cfg, model, tok)
    code, _, err = _main(capsys, "--out-dir", str(tmp_path / "o"), "--train-file", str(train),
                         "--prompts-per-step", "10")
    assert code == 0 and "warning: --prompts-per-step 10 is more than the 4 training rows" in err
    order = PromptOrder(4, 0)
    assert len(order.take(10)) == 10


# ----------------------------------------------------------------------------- early, clean failures


@pytest.mark.parametrize("name", ["model", "checkpoints"])
def test_output_path_blocked_by_a_file_fails_at_start(tmp_path, capsys, name):
    out = tmp_path / "o"
    out.mkdir()
    (out / name).write_text("x")
    code, _, err = _main(capsys, "--out-dir", str(out), "--save-every", "1")
    assert code == 2 and f"output directory {str(out / name)!r} is a file" in err
    assert "eval before" not in err  # nothing ran


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "invalid --lr inf: must be a finite number"),
    (["--grad-clip", "nan"], "invalid --grad-clip nan: must be a finite number"),
    (["--epsilon-low", "nan"], "invalid --epsilon-low nan: must be a finite number"),
    (["--temperature=-inf"], "invalid --temperature -inf: must be a finite number"),
    (["--device", "tpu"], "invalid --device 'tpu'"),
    (["--report-to", "mlflow"], "invalid --report-to 'mlflow'"),
])
def test_non_finite_and_unknown_options_are_config_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert message in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a build or host without CUDA")
def test_cuda_device_and_triton_backend_on_cpu_exit_2(tmp_path, capsys, monkeypatch):
    code, _, err = _main(capsys, "--out-dir", str(tmp_path / "a"), "--device", "cuda")
    assert code == 2 and "invalid --device 'cuda': CUDA is not available" in err
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = _main(capsys, "--out-dir", str(tmp_path / "b"), "--backend", "triton")
    assert code == 2 and "invalid --backend 'triton' on device cpu" in err


def test_reward_file_works_and_reward_errors_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _reward_file(tmp_path, "def ok(prompts, completions, **kw):\n    return [0.5] * len(completions)\n"
                           "def boom(prompts, completions, **kw):\n    raise KeyError('oops')\n")
    code, _, err = _main(capsys, "--out-dir", "a", "--reward", "./rw.py:ok")
    assert code == 0, err
    code, _, err = _main(capsys, "--out-dir", "b", "--reward", "./missing.py:ok")
    assert code == 2 and "error: no file './missing.py'" in err
    code, _, err = _main(capsys, "--out-dir", "c", "--reward", "./rw.py:boom")
    assert code == 2 and "error: reward function 'boom' raised on sample 0: KeyError" in err
    assert "Traceback" not in err


def test_model_dir_without_weights_exits_2(tmp_path, capsys):
    from fastgrpo.tasks.tiny_model import WARMUP_DIR
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text((WARMUP_DIR / "config.json").read_text())
    code, _, err = _main(capsys, "--out-dir", str(tmp_path / "o"), "--model", str(m))
    assert code == 2 and "has a config.json but no weights" in err


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "invalid --steps 0"),
                                           (["--batch-size", "-1"], "invalid --batch-size -1"),
                                           (["--lr", "nan"], "invalid --lr nan")])
def test_sft_rejects_bad_values(tmp_path, capsys, argv, message):
    from fastgrpo.trainer.sft import main as sft_main
    with pytest.raises(SystemExit) as e:
        sft_main(["--out", str(tmp_path), *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: " + message in err


def test_collapsed_run_warns_naming_the_steps(tmp_path, capsys):
    f = _reward_file(tmp_path, "def zero(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    code, _, err = _main(capsys, "--out-dir", str(tmp_path / "o"), "--rewards", f"{f}:zero",
                         "--steps", "3", "--collapse-warn-steps", "2")
    assert code == 0, err
    assert "warning: steps 1-2: every group's completions got equal rewards" in err


# ----------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig, code_", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_first_signal_checkpoints_and_exits_with_resume_hint(tmp_path, capsys, sig, code_):
    # the signal comes during the first training step's scoring (the held-out eval scores
    # one completion per prompt, a step group_size = 2 per prompt)
    f = _reward_file(tmp_path, "import os, signal\nSENT = []\n"
                     "def kill(prompts, completions, **kw):\n"
                     f"    if not SENT and len(completions) > 1:\n        SENT.append(1)\n"
                     f"        os.kill(os.getpid(), {int(sig)})\n"
                     "    return [0.0] * len(completions)\n")
    out = tmp_path / "o"
    before = signal.getsignal(sig)  # SIG_IGN where the test runner was started in the background
    code, _, err = _main(capsys, "--out-dir", str(out), "--steps", "3", "--reward", f"{f}:kill=0")
    assert code == code_, err
    assert "stopped after step 1 of 3" in err and "--resume auto" in err
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert not (out / "model").exists()
    assert signal.getsignal(sig) == before   # the run restored the handler it found
    code, _, err = _main(capsys, "--out-dir", str(out), "--steps", "3", "--reward", f"{f}:kill=0",
                         "--resume", "auto")
    assert code == 0, err
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]


def test_second_signal_exits_at_once(tmp_path, capsys):
    f = _reward_file(tmp_path, "import os, signal\n"
                     "def kill(prompts, completions, **kw):\n"
                     "    if len(completions) > 1:  # a training step, not the held-out eval\n"
                     "        os.kill(os.getpid(), signal.SIGTERM)\n"
                     "        os.kill(os.getpid(), signal.SIGTERM)\n"
                     "    return [0.0] * len(completions)\n")
    out = tmp_path / "o"
    code, _, err = _main(capsys, "--out-dir", str(out), "--steps", "3", "--reward", f"{f}:kill=0")
    assert code == 143 and "SIGTERM again: exiting now" in err
    assert list_checkpoints(out) == []


# ----------------------------------------------------------------------------- honest logs


def test_metrics_full_precision_nulls_and_short_stdout(tmp_path, capsys):
    line = to_json({"a": 1 / 3, "b": math.nan, "c": math.inf, "step": 1})
    assert json.loads(line) == {"a": 1 / 3, "b": None, "c": None, "step": 1}
    train = _train_file(tmp_path)
    out = tmp_path / "o"
    code, stdout, err = _main(capsys, "--out-dir", str(out), "--train-file", str(train),
                              "--lr", "0.000123456789", "--warmup-steps", "0")
    assert code == 0, err
    assert "step 1/1  reward" in stdout and "{" not in stdout  # the JSON is in the file only
    summary = json.loads((out / "summary.json").read_text())  # strict JSON (no NaN)
    assert summary["eval_after"] == {"accuracy": None, "validity": None}
    assert any("no held-out rows" in n for n in summary["notes"])
    m = _metrics(out)[0]
    from fastgrpo.trainer.learn import lr_at
    assert m["lr"] == lr_at(0, parse_args(["--lr", "0.000123456789", "--warmup-steps", "0"]))
    assert m["lr"] != round(m["lr"], 6)  # not rounded


def test_report_to_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "o"
    code, _, err = _main(capsys, "--out-dir", str(out), "--report-to", "tensorboard")
    assert code == 0, err
    assert list((out / "tb").glob("events.out.tfevents.*"))
