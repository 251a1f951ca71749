"""Issue 29: nothing lost at the finish line.  A finished training's model is on disk whatever
happens after it (a plot, a full disk, a signal); a full disk or an I/O error is an ``error:``
naming the file, with the partial file removed and the checkpoint to resume from named; bad
resumes, tokenizers, processors and missing optional packages are refused before the first
step; signals do what their message says in every phase; the lock file goes on every exit path;
files follow the umask; text readers take ``\\r\\n`` and a UTF-8 BOM.  Short in-process runs of
the shipped warm-up model on CPU (as tests/test_run_safety.py)."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgrpo.tasks.arithmetic import make_splits
from fastgrpo.tasks.data import DataError, load_jsonl, write_jsonl
from fastgrpo.tasks.tiny_model import WARMUP_DIR
from fastgrpo.trainer import evaluation as eval_mod
from fastgrpo.trainer import finish as finish_mod
from fastgrpo.trainer import setup as setup_mod
from fastgrpo.trainer.checkpoint import list_checkpoints, verify_checkpoint
from test_run_safety import _main, _train_file  # the same in-process harness

pytestmark = pytest.mark.usefixtures("one_thread")

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _no_matplotlib(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError


# ----------------------------------------------------------------------------- the finish


def test_train_file_without_eval_file_keeps_model_and_plot(tmp_path, capsys, monkeypatch):
    """The issue's reproduction: no held-out rows (NaN evals) with the text-fallback plot."""
    _no_matplotlib(monkeypatch)
    out = tmp_path / "o"
    code, _, err = _main(capsys, "--out-dir", str(out), "--train-file", str(_train_file(tmp_path)),
                         "--plot")
    assert code == 0, err
    assert (out / "model" / "model.safetensors").is_file() and (out / "curves.png").is_file()
    assert json.loads((out / "summary.json").read_text())["eval_after"]["accuracy"] is None


def test_a_failing_plot_or_report_is_a_warning_and_the_model_stays(tmp_path, capsys, monkeypatch):
    from fastgrpo.trainer.task import Task

    def broken(*a, **k):
        raise ValueError("cannot convert float NaN to integer")
    monkeypatch.setattr(finish_mod, "plot_curves", broken)
    monkeypatch.setattr(Task, "report", broken)
    out = tmp_path / "o"
    code, _, err = _main(capsys, "--out-dir", str(out), "--plot")
    assert code == 0, err
    assert "warning: could not write the curves plot (curves.png) (ValueError: cannot convert" in err
    assert "warning: could not write the final report" in err
    assert f"the trained model is in {out / 'model'}" in err
    assert (out / "model" / "model.safetensors").is_file() and (out / "summary.json").is_file()


def _fallback_pixels(path: Path) -> bytes:
    import zlib
    data = path.read_bytes()
    idat, i = b"", 8
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        if data[i + 4:i + 8] == b"IDAT":
            idat += data[i + 8:i + 8 + n]
        i += 12 + n
    return zlib.decompress(idat)


@pytest.mark.parametrize("history, before, after", [
    ([{"step": 1, "reward/mean": math.nan, "accuracy": None, "kl": math.inf},
      {"step": 2, "reward/mean": 0.5, "accuracy": 0.25, "eval/accuracy": math.nan},
      {"step": 3, "reward/mean": None, "eval/accuracy": None}],
     {"accuracy": math.nan, "validity": None}, {"accuracy": None}),
    ([], {"accuracy": 0.25}, {"accuracy": 0.5}),                      # no step logged
    ([], None, None),
    ([{"step": 1}], {}, {}),                                         # no value at all
])
def test_plots_skip_nan_none_and_empty_values(tmp_path, monkeypatch, history, before, after):
    from fastgrpo.trainer.plot import _eval_points, plot_bands, plot_curves
    _no_matplotlib(monkeypatch)
    path = plot_curves(history, before, after, tmp_path / "fallback.png")
    assert len(_fallback_pixels(path)) == 2 * 220 * (1 + 3 * 3 * 320)  # a whole 960x440 image
    plot_bands({"a": ([0, 1, 2], [math.nan, 0.5, None], [0.1, math.inf, 0.1]), "empty": ([], [], [])},
               tmp_path / "bands.png")
    # the held-out points drawn: the finite ones only
    pts = _eval_points(history, before, after, [m["step"] for m in history])
    want = [(s, v) for s, v in [(0, (before or {}).get("accuracy"))] +
            [(m["step"], m.get("eval/accuracy")) for m in history if "eval/accuracy" in m] +
            ([(history[-1]["step"], (after or {}).get("accuracy"))] if history else [])
            if isinstance(v, float) and math.isfinite(v)]
    assert pts == want


def test_matplotlib_plot_gets_finite_eval_points_only(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    from fastgrpo.trainer.plot import plot_curves
    calls = []
    real = Axes.plot

    def spy(self, *args, **kw):
        calls.append((args, kw))
        return real(self, *args, **kw)
    monkeypatch.setattr(Axes, "plot", spy)
    history = [{"step": 1, "accuracy": None, "eval/accuracy": math.nan}, {"step": 2, "accuracy": 0.5}]
    plot_curves(history, {"accuracy": None}, {"accuracy": 0.75}, tmp_path / "c.png")
    held = [a for a, kw in calls if kw.get("label") == "held-out greedy"]
    assert held == [((2,), (0.75,), "o-")]
    plot_curves([], {"accuracy": 0.5}, {"accuracy": 0.75}, tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 0


# ----------------------------------------------------------------------------- disk full


class _FullDisk:
    """``open``/``write`` that writes half of what is asked, then raises ENOSPC, from the
    ``nth`` write to a file named ``name`` on."""

    def __init__(self, name: str, nth: int):
        self.name, self.nth, self.count = name, nth, 0

    def open(self, file, mode="r", *a, **k):
        f = open(file, mode, *a, **k)
        if Path(file).name != self.name:
            return f
        outer = self

        class Half:
            def __getattr__(self, attr):
                return getattr(f, attr)

            def write(self, data):
                outer.count += 1
                if outer.count >= outer.nth:
                    f.write(bytes(data[:len(data) // 2]))
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return f.write(data)
        return Half()


def _fail_on_call(real, n, exc):
    count = [0]

    def f(*a, **k):
        count[0] += 1
        if count[0] >= n:
            raise exc
        return real(*a, **k)
    return f


@pytest.mark.parametrize("where", ["checkpoint weights", "checkpoint state", "metrics", "samples",
                                   "model"])
def test_disk_full_at_each_write_is_an_error_naming_the_file(tmp_path, capsys, monkeypatch, where):
    import safetensors.torch
    import transformers
    import transformers.modeling_utils  # noqa: F401  (binds the real save_file before the patch)
    import fastgrpo.trainer.logs as logs
    out = tmp_path / "o"
    file = {"checkpoint weights": "model.safetensors", "checkpoint state": "trainer_state.pt",
            "metrics": "metrics.jsonl", "samples": "samples.jsonl", "model": "model.safetensors"}[where]
    if where == "checkpoint weights":  # the second checkpoint's weights
        monkeypatch.setattr(safetensors.torch, "save_file",
                            _fail_on_call(safetensors.torch.save_file, 2, ENOSPC))
    elif where == "checkpoint state":  # what torch.save raised on the 3 MB filesystem
        monkeypatch.setattr(torch, "save", _fail_on_call(torch.save, 2, RuntimeError(
            "[enforce fail at inline_container.cc:672] . unexpected pos 2176 vs 2064")))
    elif where in ("metrics", "samples"):  # the second line of the file, half written
        monkeypatch.setattr(logs, "open", _FullDisk(file, 2).open, raising=False)
    else:  # the final model's weights: half a file, then the disk is full
        real = transformers.PreTrainedModel.save_pretrained

        def save_pretrained(self, directory, **kw):
            real(self, directory, **kw)
            p = Path(directory) / "model.safetensors"
            p.write_bytes(p.read_bytes()[:1000])
            raise ENOSPC
        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_pretrained)
    code, _, err = _main(capsys, "--out-dir", str(out), "--steps", "2", "--save-every", "1",
                         "--sample-every", "1")
    assert code == 2, err
    line = next(x for x in err.splitlines() if x.startswith("error: "))
    assert f"error: could not write {out}" in line and "it needs about" in line
    # torch.save's zip writer says no more than this on a full disk (the tmpfs test below
    # sees "no space left" there: its free space is below the bytes needed)
    why = "[enforce fail at inline_container.cc:672] . unexpected pos 2176" if where == "checkpoint state" else "no space left on device"
    assert f"{file}: {why}" in line
    assert "Traceback" not in err
    ckpts = list_checkpoints(out)
    newest = ckpts[0][1]
    assert verify_checkpoint(newest)[0]
    assert f"the newest checkpoint {newest} (step {ckpts[0][0]}) is untouched" in line
    assert f"plus --resume {newest}" in line
    # the partial file is gone: no temporary directories, no half line, no half model
    assert not list(out.rglob(".tmp-*")) and not list(out.rglob(".old-*"))
    assert not (out / "model").exists()
    for name in ("metrics.jsonl", "samples.jsonl"):
        text = (out / name).read_text()
        assert all(json.loads(x) for x in text.splitlines()) is not None and text.endswith("\n")
    monkeypatch.undo()
    code, _, err = _main(capsys, "--out-dir", str(out), "--steps", "2", "--save-every", "1",
                         "--sample-every", "1", "--resume", str(newest))
    assert code == 0, err
    assert _steps(out) == [1, 2] and (out / "model" / "model.safetensors").is_file()


def test_a_failing_logger_is_a_warning_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    def full(*a, **k):
        raise ENOSPC
    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    out = tmp_path / "o"
    code, _, err = _main(capsys, "--out-dir", str(out), "--steps", "2", "--report-to", "tensorboard")
    assert code == 0, err
    assert err.count("warning: --report-to tensorboard failed (OSError: [Errno 28]") == 1
    assert _steps(out) == [1, 2] and (out / "model" / "model.safetensors").is_file()


def test_summary_write_failure_is_a_warning(tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise ENOSPC
    monkeypatch.setattr(finish_mod, "write_file", full)
    out = tmp_path / "o"
    code, _, err = _main(capsys, "--out-dir", str(out))
    assert code == 0, err
    assert "warning: could not write summary.json" in err
    assert (out / "model" / "model.safetensors").is_file()


def _can_mount_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(path)], check=True)
    return ok


def test_a_real_full_filesystem(tmp_path, capsys):
    """A 4 MB tmpfs: the first checkpoint of the warm-up model (2.7 MB of weights) fits, the
    final model does not: the error names it, model/ is absent, the checkpoint is named."""
    mnt = tmp_path / "small"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("needs root and a mountable tmpfs (the patched-write test covers the rest)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        out = mnt / "o"
        code, _, err = _main(capsys, "--out-dir", str(out), "--save-every", "1")
        assert code == 2, err
        line = next(x for x in err.splitlines() if x.startswith("error: "))
        assert f"error: could not write {out / 'model' / 'model.safetensors'}: no space left" in line
        import re
        need, free = map(float, re.search(r"it needs about ([\d.]+) MB; ([\d.]+) MB free", line).groups())
        assert free < need < 4
        ckpt = out / "checkpoints" / "step-00000001"
        assert verify_checkpoint(ckpt)[0] and f"plus --resume {ckpt}" in line
        assert not (out / "model").exists() and not list(out.rglob(".tmp-*"))
        assert not (out / ".lock").exists() and "Traceback" not in err
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_resume_auto_after_a_crash_without_checkpoint_does_not_suggest_itself(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # what a crash before a checkpoint leaves
    code, _, err = _main(capsys, "--out-dir", str(out), "--resume", "auto")
    assert code == 2
    assert "no valid checkpoint" in err and "it cannot be continued: pass --overwrite" in err
    assert "pass --resume auto" not in err


def test_write_directory_is_complete_or_absent(tmp_path):
    from fastgrpo.trainer.diskio import WriteError, write_directory, writing
    final = tmp_path / "model"

    def fill(data, fault=None):
        def f(tmp):
            (tmp / "a.txt").write_text(data)
            with writing(tmp / "b.bin", 10):
                (tmp / "b.bin").write_bytes(b"12345")  # half of it, then the fault
                if fault is not None:
                    raise fault
        return f
    write_directory(final, fill("one"))
    # a failed write; an interrupt mid-write (what a signal or SystemExit does)
    for fault, raised in ((ENOSPC, WriteError), (KeyboardInterrupt(), KeyboardInterrupt)):
        with pytest.raises(raised):
            write_directory(final, fill("new", fault))
        assert (final / "a.txt").read_text() == "one" and sorted(os.listdir(tmp_path)) == ["model"]
    # a dead writer's temporary directory (kill -9) is removed by the next write
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / f".tmp-model-{dead}").mkdir()
    write_directory(final, fill("two"))
    assert (final / "a.txt").read_text() == "two" and sorted(os.listdir(tmp_path)) == ["model"]


def test_write_error_names_the_final_path_and_the_sizes(tmp_path):
    from fastgrpo.trainer.diskio import WriteError, write_directory, writing

    def fill(tmp):
        with writing(tmp / "w.safetensors", 3 * 2 ** 20):
            raise ENOSPC
    with pytest.raises(WriteError) as e:
        write_directory(tmp_path / "model", fill)
    msg = str(e.value)
    assert msg.startswith(f"could not write {tmp_path / 'model' / 'w.safetensors'}: no space left "
                          f"on device (it needs about 3.0 MB; ")
    assert f"{shutil.disk_usage(tmp_path).free / 2 ** 30:.1f} GB free on that filesystem" in msg \
        or "MB free" in msg


# ----------------------------------------------------------------------------- before the first step


def _other_vocab_model(tmp_path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM
    conf = AutoConfig.from_pretrained(WARMUP_DIR)
    conf.vocab_size += 64
    d = tmp_path / "other"
    AutoModelForCausalLM.from_config(conf).save_pretrained(d)
    for f in WARMUP_DIR.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, d / f.name)
    return d


@pytest.mark.parametrize("force", [False, True])
def test_resume_with_a_model_of_other_shapes_names_the_parameter(tmp_path, capsys, force):
    out = tmp_path / "o"
    assert _main(capsys, "--out-dir", str(out), "--save-every", "1", "--no-save")[0] == 0
    other = _other_vocab_model(tmp_path)
    code, _, err = _main(capsys, "--out-dir", str(out), "--steps", "2", "--model", str(other),
                         "--resume", "auto", *(["--resume-force"] if force else []))
    assert code == 2, err
    assert "parameter 'model.embed_tokens.weight' has shape" in err
    import re
    a, b = re.search(r"has shape \[(\d+), \d+\] in the checkpoint and \[(\d+), \d+\]", err).groups()
    assert int(b) == int(a) + 64
    assert f"this run has --model {str(other)!r}" in err and "Traceback" not in err
    assert _steps(out) == [1]


def test_model_dir_without_tokenizer_names_the_files(tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(WARMUP_DIR, d, ignore=shutil.ignore_patterns("tokenizer*"))
    code, _, err = _main(capsys, "--out-dir", str(tmp_path / "o"), "--model", str(d))
    assert code == 2, err
    assert f"error: --model {d}: its tokenizer cannot be loaded" in err
    assert "looked for tokenizer.json, tokenizer_config.json" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory):
    pytest.importorskip("PIL")
    from fastgrpo.tasks.tiny_vl import save_tiny_vl
    return save_tiny_vl(tmp_path_factory.mktemp("vl") / "model", "qwen2_vl", seed=0)


@pytest.mark.parametrize("content", ["{not json", '{"image_processor_type": 3}'])
def test_vl_model_whose_processor_cannot_be_built(tmp_path, capsys, vl_model, content):
    d = tmp_path / "vl"
    shutil.copytree(vl_model, d)
    (d / "preprocessor_config.json").write_text(content)
    rows = [{"prompt": "<image> How many bars ?", "answer": "3", "image": "c.png"}]
    from fastgrpo.tasks.tiny_vl import random_image
    random_image(32, 32).save(tmp_path / "c.png")
    write_jsonl(rows, tmp_path / "t.jsonl")
    code, _, err = _main(capsys, "--out-dir", str(tmp_path / "o"), "--model", str(d),
                         "--train-file", str(tmp_path / "t.jsonl"), "--rollout", "hf")
    assert code == 2, err
    assert f"cannot build its image processor from {str(d / 'preprocessor_config.json')!r}" in err
    assert "Traceback" not in err


def test_image_path_that_is_a_directory(tmp_path):
    from fastgrpo.trainer.vision import check_rows
    from fastgrpo.vl import VisionError, load_images
    (tmp_path / "img").mkdir()
    with pytest.raises(VisionError, match="image path .*img' is a directory, not an image file"):
        check_rows([{"prompt": "<image> x", "image": "img"}], tmp_path, "train")
    with pytest.raises(VisionError, match="is a directory"):
        load_images([tmp_path / "img"])


@pytest.mark.parametrize("argv, module, install", [
    (["--task", "charts"], "PIL", "pip install 'fastgrpo[vl]'"),
    (["--lora-r", "2"], "peft", "pip install 'fastgrpo[lora]'"),
    (["--rollout", "vllm"], "vllm", "pip install 'fastgrpo[vllm]'"),
    (["--report-to", "tensorboard"], "tensorboard", "pip install"),
    (["--report-to", "wandb"], "wandb", "pip install 'fastgrpo[wandb]'"),
])
def test_missing_optional_package_is_an_error_before_any_work(tmp_path, capsys, monkeypatch,
                                                             argv, module, install):
    monkeypatch.setitem(sys.modules, module, None)  # find_spec -> None: "not installed"
    loaded = []
    monkeypatch.setattr(setup_mod, "load_model", lambda *a, **k: loaded.append(1))
    out = tmp_path / "o"
    code, _, err = _main(capsys, "--out-dir", str(out), *argv)
    assert code == 2, err
    assert err.startswith("error: ") and install in err and "Traceback" not in err
    assert not loaded and not (out / "metrics.jsonl").exists()


def test_missing_pillow_for_the_charts_warm_up(capsys, monkeypatch):
    from fastgrpo.trainer.sft import main as sft_main
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(SystemExit) as e:
        sft_main(["--task", "charts", "--steps", "1"])
    assert e.value.code == 2
    assert "error: --task charts (chart images) needs Pillow" in capsys.readouterr().err


def test_missing_pillow_for_a_vl_model_or_image_rows(tmp_path, capsys, monkeypatch, vl_model):
    monkeypatch.setitem(sys.modules, "PIL", None)
    code, _, err = _main(capsys, "--out-dir", str(tmp_path / "o"), "--model", str(vl_model))
    assert code == 2 and "needs Pillow, which is not installed: pip install 'fastgrpo[vl]'" in err
    from fastgrpo.trainer.config import ConfigError, parse_args
    from fastgrpo.trainer.vision import setup_vision
    from fastgrpo.vl import VisionAdapter  # noqa: F401  (imported before PIL goes)
    model = torch.nn.Linear(1, 1)
    model.config = type("C", (), {"vision_config": {}, "model_type": "qwen2_vl"})()
    with pytest.raises(ConfigError, match=r"a vision-language model \(its images\) needs Pillow"):
        setup_vision(parse_args([]), model, None, [{"prompt": "<image> x", "image": "a.png"}], [])
    # images given to a text-only model: that error, whether Pillow is there or not
    with pytest.raises(DataError, match="has an image, but the model"):
        setup_vision(parse_args([]), torch.nn.Linear(1, 1), None, [{"prompt": "x", "image": "a.png"}], [])


def test_pillow_is_in_a_dependency_list():
    import tomllib
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    vl = meta["project"]["optional-dependencies"]["vl"]
    spec = next(x for x in vl if x.lower().startswith("pillow"))
    from importlib.metadata import version
    from packaging.specifiers import SpecifierSet
    assert version("pillow") in SpecifierSet(spec[len("pillow"):])


def test_eval_file_without_train_file_is_an_error(tmp_path, capsys):
    write_jsonl(make_splits(seed=3, n_train=1, n_eval=1)[1], tmp_path / "e.jsonl")
    code, _, err = _main(capsys, "--out-dir", str(tmp_path / "o"), "--eval-file", str(tmp_path / "e.jsonl"))
    assert code == 2 and "error: invalid --eval-file" in err and "needs --train-file" in err


# ----------------------------------------------------------------------------- signals


def _signal_on_eval(monkeypatch, sig, nth):
    """Send ``sig`` as the ``nth`` greedy evaluation starts generating; records the
    generations that ran to completion."""
    real, calls, done = eval_mod.generate, [0], []

    def generate(*a, **k):
        calls[0] += 1
        if calls[0] == nth:
            os.kill(os.getpid(), sig)
        ro = real(*a, **k)
        done.append(calls[0])
        return ro
    monkeypatch.setattr(eval_mod, "generate", generate)  # the greedy evaluation's
    return done


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_in_the_initial_eval_stops_it_without_training(tmp_path, capsys, monkeypatch, sig):
    done = _signal_on_eval(monkeypatch, sig, 1)
    out = tmp_path / "o"
    code, _, err = _main(capsys, "--out-dir", str(out), "--steps", "3", "--save-every", "1")
    assert code == 128 + sig, err
    name = signal.Signals(sig).name
    assert f"{name}: stopping the initial evaluation; the run ends before training" in err
    assert f"interrupted: {name}: stopped before training; nothing was trained or written" in err
    assert done == []  # the evaluation's generation never ran to its end
    assert not (out / "metrics.jsonl").exists() and list_checkpoints(out) == []
    assert not (out / ".lock").exists()


def test_signal_during_set_up_stops_before_training(tmp_path, capsys, monkeypatch):
    real, done = setup_mod.load_model, []

    def load_model(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        done.append(real(*a, **k))
        return done[-1]
    monkeypatch.setattr(setup_mod, "load_model", load_model)
    out = tmp_path / "o"
    code, _, err = _main(capsys, "--out-dir", str(out), "--save-every", "1")
    assert code == 130, err
    assert "SIGINT: stopping the set-up; the run ends before training" in err
    assert "interrupted: SIGINT: stopped before training" in err and "Traceback" not in err
    assert done == [] and sorted(p.name for p in out.iterdir()) == []


def test_signal_in_the_final_eval_after_the_model_is_saved(tmp_path, capsys, monkeypatch):
    done = _signal_on_eval(monkeypatch, signal.SIGINT, 2)
    out = tmp_path / "o"
    code, _, err = _main(capsys, "--out-dir", str(out), "--steps", "2")
    assert code == 130, err
    assert (f"SIGINT: stopping the final evaluation (the trained model is already in "
            f"{out / 'model'}); summary.json is written without eval_after") in err
    assert done == [1]
    assert (out / "model" / "model.safetensors").is_file()
    s = json.loads((out / "summary.json").read_text())
    assert s["eval_after"] is None and "SIGINT ended the run before its final evaluation" in s["notes"][0]
    assert s["eval_before"]["accuracy"] is not None and _steps(out) == [1, 2]


def test_signal_in_a_periodic_eval_checkpoints_that_step(tmp_path, capsys, monkeypatch):
    done = _signal_on_eval(monkeypatch, signal.SIGTERM, 2)
    out = tmp_path / "o"
    code, _, err = _main(capsys, "--out-dir", str(out), "--steps", "3", "--eval-every", "1")
    assert code == 143, err
    assert "SIGTERM: stopping this evaluation; step 1 is checkpointed, then the run exits" in err
    assert done == [1] and [s for s, _ in list_checkpoints(out)] == [1]
    assert "eval/accuracy" not in json.loads((out / "metrics.jsonl").read_text())


# ----------------------------------------------------------------------------- lock, umask


def test_lock_file_released_on_every_exit_path(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    assert _main(capsys, "--out-dir", str(out))[0] == 0                          # normal
    assert not (out / ".lock").exists()
    code, _, err = _main(capsys, "--out-dir", str(out), "--resume", "auto", "--model", "/nope")
    assert code == 2 and not (out / ".lock").exists()                             # error
    _signal_on_eval(monkeypatch, signal.SIGTERM, 2)
    code, _, err = _main(capsys, "--out-dir", str(out), "--overwrite")
    assert code == 143 and not (out / ".lock").exists()                           # signal
    from fastgrpo.trainer.outdir import OutDirLock
    with OutDirLock(out):                                                         # refused start
        assert _main(capsys, "--out-dir", str(out), "--overwrite")[0] == 2
        assert (out / ".lock").read_text().strip() == str(os.getpid())         # still the owner's
    assert not (out / ".lock").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_files_follow_the_umask(tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        out = tmp_path / "o"
        code, _, err = _main(capsys, "--out-dir", str(out), "--save-every", "1")
    finally:
        os.umask(old)
    assert code == 0, err
    want = 0o666 & ~umask
    ckpt = list_checkpoints(out)[0][1]
    for f in [out / "model" / "model.safetensors", out / "model" / "config.json",
              ckpt / "model.safetensors", ckpt / "trainer_state.pt", out / "summary.json",
              out / "metrics.jsonl"]:
        assert f.stat().st_mode & 0o777 == want, f
    assert (out / "model").stat().st_mode & 0o777 == 0o777 & ~umask


# ----------------------------------------------------------------------------- text files


def test_text_readers_take_crlf_and_a_bom(tmp_path):
    rows = make_splits(seed=3, n_train=3, n_eval=1)[0]
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in rows) + b"\r\n")
    assert load_jsonl(f) == load_jsonl(_train_file(tmp_path, 3))
    from fastgrpo.trainer.config import load_config_file
    (tmp_path / "c.toml").write_bytes(b"\xef\xbb\xbfsteps = 3\r\nlr = 0.5\r\n")
    assert load_config_file(str(tmp_path / "c.toml")) == {"steps": 3, "lr": 0.5}
    from fastgrpo.kb import read_jsonl as kb_read
    (tmp_path / "kb.jsonl").write_bytes(b'\xef\xbb\xbf{"id": "a", "text": "x"}\r\n\r\n{"id": "b", "text": "y"}\r\n')
    assert [r for _, r in kb_read(tmp_path / "kb.jsonl")] == [{"id": "a", "text": "x"}, {"id": "b", "text": "y"}]
    from fastgrpo.trainer.logs import restore_log
    (tmp_path / "m.jsonl").write_bytes(b'\xef\xbb\xbf{"step": 1}\r\n{"step": 2}\r\n')
    assert restore_log(tmp_path / "m.jsonl", 1) == [{"step": 1}]


def test_preprocessor_config_with_a_bom_and_crlf(tmp_path, vl_model):
    from fastgrpo.vl import load_image_processor
    d = tmp_path / "vl"
    shutil.copytree(vl_model, d)
    p = d / "preprocessor_config.json"
    p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes().replace(b"\n", b"\r\n"))
    assert type(load_image_processor(d)).__name__ == type(load_image_processor(vl_model)).__name__


def test_readme_what_happens_when_table_names_existing_tests():
    import re
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text(encoding="utf-8")
    table = text[text.index("What happens when:"):].split("\n\n")[1]
    rows = [r for r in table.splitlines()[2:] if r.startswith("|")]
    events = [r.split("|")[1].strip() for r in rows]
    for word in ("disk full", "kill -9", "SIGINT", "corrupt", "mismatched resume", "bad data"):
        assert any(word in e for e in events), word
    file = None  # a bare ::name is in the file named last
    for row in rows:
        cell, named = row.split("|")[3], 0
        for m in re.finditer(r"`(tests/[\w/]+\.py)?::(\w+)", cell):
            file = m.group(1) or file
            src = (root / file).read_text(encoding="utf-8")
            assert re.search(rf"^def {m.group(2)}\(", src, re.M), (file, m.group(2))
            named += 1
        assert named, row
