"""``--report-to wandb`` (issue 17): offline by default, no account, nothing sent; the offline run
holds exactly the metrics of ``metrics.jsonl``, the config, and the run's exit code.

The wandb tests skip when wandb is not installed; ``FASTGRPO_REQUIRE_WANDB=1`` (CI's test
environment, which installs ``.[dev]`` and with it the wandb extra) makes that an error.  The
offline run is read back with wandb's own reader of its ``.wandb`` transaction log
(``wandb leet inspect --json``)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fastgrpo.trainer.config import ConfigError, parse_args, report_targets
from fastgrpo.trainer.loop import main

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8",
        "--eval-size", "1", "--sample-every", "0", "--no-plot", "--no-progress", "--no-save",
        "--device", "cpu", "--threads", "1"]
WANDB_VARS = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_NAME", "WANDB_DIR",
              "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_BASE_URL")


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """wandb installed (else skip, or fail under FASTGRPO_REQUIRE_WANDB=1), no account, no
    WANDB_* settings of the user's, and its config/cache/data directories in ``tmp_path``."""
    if importlib.util.find_spec("wandb") is None:
        if os.environ.get("FASTGRPO_REQUIRE_WANDB") == "1":
            pytest.fail("FASTGRPO_REQUIRE_WANDB=1 but wandb is not installed "
                        "(pip install 'fastgrpo[wandb]')")
        pytest.skip("wandb is not installed (pip install 'fastgrpo[wandb]')")
    for k in WANDB_VARS:
        monkeypatch.delenv(k, raising=False)
    for k in ("CONFIG", "CACHE", "DATA"):
        monkeypatch.setenv(f"WANDB_{k}_DIR", str(tmp_path / f"wandb-{k.lower()}"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def _wandb_runs(out: Path) -> list[list[dict]]:
    """The records of each offline run under ``<out>/wandb``, oldest first, as wandb's own
    reader of ``.wandb`` files prints them.  Ordered by when each file was last written (a run
    finishes before the next starts): the folder names hold the start time to the second only,
    so two runs of the same second would sort by their random run ids."""
    runs = []
    for f in sorted((out / "wandb").glob("offline-run-*/run-*.wandb"),
                    key=lambda f: f.stat().st_mtime_ns):
        p = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(f)],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        runs.append([json.loads(x) for x in p.stdout.splitlines() if x.strip()])
    return runs


def _of(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def _exit_codes(records: list[dict]) -> list[int]:
    return [e["exit_code"] for e in _of(records, "exit")]


def _history(records: list[dict]) -> dict[int, dict]:
    """step -> the logged metrics, without wandb's own ``_runtime``/``_step``/``_timestamp``."""
    rows = {}
    for h in _of(records, "history"):
        item = h["item"]
        assert item["_step"] == h["step"]["num"]
        rows[item["_step"]] = {k: v for k, v in item.items() if not k.startswith("_")}
    return rows


def _as_json_log(v):
    """A wandb history value as metrics.jsonl writes it (non-finite: null)."""
    if isinstance(v, str) and v in ("NaN", "Infinity", "-Infinity"):
        return None
    return v


def _metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r.pop("step"): r for r in rows}


class _Listener:
    """A local TCP port that records every connection (where wandb would send anything)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.sock.close()


def test_wandb_offline_run_holds_the_metrics_config_and_sends_nothing(tmp_path, wandb_env):
    out = tmp_path / "o"
    net = _Listener()  # wandb's server and every HTTP(S) proxy point here: any use is seen
    env = {**os.environ, "WANDB_BASE_URL": net.url, "OMP_NUM_THREADS": "1"}
    for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env[k] = net.url
    for k in ("NO_PROXY", "no_proxy"):
        env.pop(k, None)
    argv = [*FAST, "--steps", "3", "--eval-every", "2", "--out-dir", str(out),
            "--report-to", "wandb"]
    try:
        p = subprocess.run([sys.executable, "-m", "fastgrpo.train", *argv], env=env,
                           capture_output=True, text=True, timeout=600)
    finally:
        net.close()
    assert p.returncode == 0, p.stderr
    assert net.connections == 0
    (records,) = _wandb_runs(out)
    metrics = _metrics(out)
    assert sorted(metrics) == [1, 2, 3] and "eval/accuracy" in metrics[2]
    history = _history(records)
    assert sorted(history) == [1, 2, 3]
    for step, row in metrics.items():  # every metric, every step, at full precision
        assert {k: _as_json_log(v) for k, v in history[step].items()} == row, step
    config = _of(records, "run")[0]["config"]["update"]
    assert config["steps"] == 3 and config["report_to"] == "wandb" and config["out_dir"] == str(out)
    assert _exit_codes(records) == [0]
    assert _of(records, "run")[0]["project"] == "fastgrpo"
    assert _of(records, "run")[0]["display_name"] == "o"


def test_wandb_run_of_a_signal_says_failed_and_a_resume_continues_the_steps(tmp_path, capsys,
                                                                           wandb_env):
    f = tmp_path / "rw.py"
    f.write_text("import os, signal\nSENT = []\n"
                 "def kill(prompts, completions, **kw):\n"
                 "    if not SENT and len(completions) > 1:  # a training step's, not the eval's\n"
                 "        SENT.append(1)\n"
                 "        os.kill(os.getpid(), signal.SIGTERM)\n"
                 "    return [0.0] * len(completions)\n")
    out = tmp_path / "o"
    argv = [*FAST, "--steps", "3", "--eval-every", "0", "--out-dir", str(out), "--save-every", "1",
            "--reward", f"{f}:kill=0", "--report-to", "wandb"]
    for extra, code_ in (([], 143), (["--resume", "auto"], 0)):
        code = 0
        try:
            main([*argv, *extra])
        except SystemExit as e:
            code = e.code
        assert code == code_, capsys.readouterr().err
    first, second = _wandb_runs(out)
    assert _exit_codes(first) == [143]
    assert _exit_codes(second) == [0]
    assert sorted(_history(first)) == [1] and sorted(_history(second)) == [2, 3]
    history = {**_history(first), **_history(second)}
    assert {s: {k: _as_json_log(v) for k, v in h.items()} for s, h in history.items()} == _metrics(out)


def test_report_to_names_the_missing_package_and_takes_a_list(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    code = 0
    try:
        main([*FAST, "--steps", "1", "--out-dir", str(tmp_path / "o"), "--report-to", "wandb"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert ("error: invalid --report-to 'wandb': needs the wandb package "
            "(pip install 'fastgrpo[wandb]')") in err
    assert not (tmp_path / "o").exists()  # refused before any work
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert report_targets(parse_args(["--report-to", "tensorboard, wandb"]).report_to) == (
        "tensorboard", "wandb")
    assert report_targets(parse_args([]).report_to) == ()
    for bad in ("mlflow", "none,wandb", "wandb,", ""):
        with pytest.raises(ConfigError, match="invalid --report-to"):
            parse_args(["--report-to", bad])
