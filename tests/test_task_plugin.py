"""A task of one's own: ``--task my_pkg.my_task:TASK`` (``fastgrpo.trainer.task.Task``).

The task module is written into a temporary folder and found on ``sys.path``, as a user's
would be; the run must use its rows, reward set, prompt encoding, evaluation, report and CLI
defaults, and nothing of the built-in task."""

from __future__ import annotations

import json
import textwrap

import pytest

from fastgrpo.trainer.config import parse_args
from fastgrpo.trainer.loop import main
from fastgrpo.trainer.sft import main as sft_main
from fastgrpo.trainer.task import Task, load_task
from test_run_safety import cli

FAST = ["--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--eval-every", "0",
        "--sample-every", "0", "--no-plot", "--no-progress", "--device", "cpu", "--threads", "1"]

TASK_MODULE = textwrap.dedent('''
    """A user's task: doubling questions, a reward for short answers."""
    from fastgrpo.rewards import RewardSet
    from fastgrpo.tasks.tokenizer import encode_prompt
    from fastgrpo.trainer.rollout import generate
    from fastgrpo.trainer.task import Task

    CALLS = []


    def brevity(prompts, completions, **kw):
        return [1.0 / (1 + len(c)) for c in completions]


    class Doubling(Task):
        name = "doubling"
        metric_aliases = {"accuracy": "brevity"}
        cli_defaults = {"max_new_tokens": 6, "eval_size": 2}

        def configure(self, cfg):
            cfg = super().configure(cfg)
            CALLS.append(("configure", cfg.max_new_tokens, cfg.eval_size))
            return cfg

        def builtin_splits(self, cfg):
            rows = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i), "doubling": i}
                    for i in range(1, 9)]
            return rows[:5], rows[5:]

        def reward_set(self, cfg, layout=None):
            return RewardSet({"brevity": brevity}, {"brevity": 1.0})

        def encode(self, tokenizer, prompt):
            CALLS.append(("encode", prompt))
            return encode_prompt(tokenizer, "Q: " + prompt)

        def evaluate(self, model, tokenizer, rows, reward_set, cfg, encode, vision=None):
            ro = generate(model, tokenizer, [encode(tokenizer, r["prompt"]) for r in rows],
                          group_size=1, do_sample=False, max_new_tokens=cfg.max_new_tokens)
            CALLS.append(("evaluate", len(rows)))
            return {"brevity": sum(brevity(None, ro.texts)) / len(rows)}

        def eval_line(self, ev):
            return f"brevity {ev['brevity']:.3f}"

        def report(self, before, after, n):
            return f"doubling report: {n} rows, brevity {before['brevity']:.3f} -> {after['brevity']:.3f}"

        def close(self):
            CALLS.append(("close",))


    TASK = Doubling
    NOT_A_TASK = 42
''')


@pytest.fixture
def user_task(tmp_path, monkeypatch):
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "my_task.py").write_text(TASK_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    mod = importlib.import_module("my_pkg.my_task")
    yield mod
    import sys
    for name in ("my_pkg.my_task", "my_pkg"):
        sys.modules.pop(name, None)


_run = cli  # fn(argv): exit code, stdout, stderr


def test_a_user_task_runs_end_to_end(user_task, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = _run(main, capsys, "--task", "my_pkg.my_task:TASK", *FAST, "--out-dir", str(out))
    assert code == 0, err
    calls = user_task.CALLS
    assert ("configure", 6, 2) in calls                        # its CLI defaults
    prompts = {c[1] for c in calls if c[0] == "encode"}
    assert prompts and all(p.startswith("What is ") for p in prompts)  # its rows, its encoding
    assert [c for c in calls if c[0] == "evaluate"] == [("evaluate", 2)] * 2  # before and after
    assert calls[-1] == ("close",)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    for m in metrics:
        assert set(k.split("/")[1] for k in m if k.startswith("rewards/")) == {"brevity"}
        assert m["accuracy"] == m["rewards/brevity/mean"]      # its metric alias
        assert m["completion_len/max"] <= 6
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["eval_before"]) == {"brevity"} and set(summary["eval_after"]) == {"brevity"}
    assert "doubling report: 2 rows" in stdout
    assert "eval before: brevity" in err


def test_explicit_options_beat_the_tasks_defaults(user_task):
    cfg = parse_args(["--task", "my_pkg.my_task:TASK", "--max-new-tokens", "5"])
    task = load_task(cfg.task)
    assert isinstance(task, Task) and type(task).__name__ == "Doubling"
    cfg = task.configure(cfg)
    assert (cfg.max_new_tokens, cfg.eval_size) == (5, 2)
    assert load_task(cfg.task) is not task                     # a fresh instance per run


@pytest.mark.parametrize("spec, says", [
    ("my_pkg.no_such_module:TASK", "no module 'my_pkg.no_such_module'"),
    ("my_pkg.my_task:MISSING", "has no 'MISSING'"),
    ("my_pkg.my_task:NOT_A_TASK", "int is not a fastgrpo.trainer.task.Task"),
    ("no_such_task", "choose one of arithmetic, charts, routing"),
])
def test_a_bad_task_is_an_error_naming_it(user_task, tmp_path, capsys, spec, says):
    code, _, err = _run(main, capsys, "--task", spec, *FAST, "--out-dir", str(tmp_path / "r"))
    assert code == 2 and f"error: invalid --task {spec!r}" in err and says in err, err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_warm_up_of_a_user_task(user_task, tmp_path, capsys):
    code, _, err = _run(sft_main, capsys, "--task", "my_pkg.my_task:TASK", "--out", str(tmp_path))
    assert code == 2 and "the task has no warm-up recipe" in err
    seen = []
    user_task.Doubling.warmup = staticmethod(seen.append)
    try:
        code, _, err = _run(sft_main, capsys, "--task", "my_pkg.my_task:TASK", "--out", "d")
    finally:
        user_task.Doubling.warmup = None
    assert code == 0 and seen == [["--task", "my_pkg.my_task:TASK", "--out", "d"]]
