"""Vision-language StepGRPO end to end on a tiny random Qwen2-VL saved to a directory, with a
JSONL of Pillow-drawn images: training, --freeze-vision, checkpoint/resume, and the data errors
(exit code 2, the message naming the row and the path)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo.tasks.data import write_jsonl
from fastgrpo.tasks.tiny_vl import save_tiny_vl
from fastgrpo.trainer.loop import main

pytestmark = pytest.mark.usefixtures("one_thread")

REWARD = '''
def reward(prompts, completions, **kw):
    assert all(isinstance(x, list) for x in kw["image"] if x is not None)
    return [float(sum(map(ord, c)) % 7) for c in completions]
'''


def _draw(path: Path, bars: list[int], size=(56, 42)):
    from PIL import Image, ImageDraw
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    w = size[0] // len(bars)
    for k, h in enumerate(bars):
        d.rectangle([k * w + 2, size[1] - h, k * w + w - 2, size[1] - 1], fill=(40 * k, 90, 200))
    im.save(path)


@pytest.fixture(scope="module")
def vl_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    model = save_tiny_vl(root / "model", "qwen2_vl", seed=0)
    (root / "data" / "img").mkdir(parents=True)
    for k in range(4):
        _draw(root / "data" / "img" / f"c{k}.png", [5 + 7 * k, 20, 30 - 5 * k],
              size=(56 + 14 * k, 42))
    rows = [{"prompt": "<image> Which bar is tallest ?", "answer": "1", "image": "img/c0.png"},
            {"prompt": "Compare <image> and <image> .", "answer": "2",
             "image": ["img/c1.png", "img/c2.png"]},
            {"prompt": "Add 3 and 4 .", "answer": "7"},              # text-only row
            {"prompt": "How many bars ?", "answer": "3", "image": ["img/c3.png"]}]
    write_jsonl(rows, root / "data" / "train.jsonl")
    write_jsonl(rows[:2], root / "data" / "eval.jsonl")
    (root / "reward.py").write_text(REWARD)
    return root


def _args(root: Path, out: Path, *extra):
    return ["--model", str(root / "model"), "--train-file", str(root / "data" / "train.jsonl"),
            "--eval-file", str(root / "data" / "eval.jsonl"), "--out-dir", str(out),
            "--rewards", f"{root / 'reward.py'}:reward", "--steps", "2", "--prompts-per-step", "2",
            "--group-size", "3", "--max-new-tokens", "6", "--eval-size", "2", "--eval-every", "0",
            "--sample-every", "0", "--micro-batch-tokens", "128", "--lr", "1e-2",
            "--warmup-steps", "0", "--device", "cpu", "--no-plot", "--no-progress",
            "--no-drop-zero-std-groups", "--no-mask-truncated", *extra]


def _weights(d: Path) -> dict:
    return load_file(str(d / "model.safetensors"))


def _changed(before: dict, after: dict, part: str) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if part in k)


def test_vl_training_end_to_end(vl_data, tmp_path):
    out = tmp_path / "run"
    main(_args(vl_data, out))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_before"]["accuracy"] is not None
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(x)["micro_batches"] >= 1 for x in lines)
    # the final model is a --model again (image processor included); vision tower trained
    assert (out / "model" / "preprocessor_config.json").is_file()
    before, after = _weights(vl_data / "model"), _weights(out / "model")
    assert _changed(before, after, "visual.") and _changed(before, after, "model.layers.")


def test_freeze_vision_trains_the_language_model_only(vl_data, tmp_path):
    out = tmp_path / "run"
    main(_args(vl_data, out, "--freeze-vision", "--steps", "1"))
    before, after = _weights(vl_data / "model"), _weights(out / "model")
    assert not _changed(before, after, "visual.") and _changed(before, after, "model.layers.")


def test_vl_checkpoint_resume_matches_uninterrupted(vl_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    main(_args(vl_data, a, "--save-every", "1"))
    ckpt = a / "checkpoints" / "step-00000001"
    assert (ckpt / "preprocessor_config.json").is_file()
    main(_args(vl_data, b, "--save-every", "1", "--resume", str(ckpt)))
    la = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lb] == [2]
    for k in ("reward/mean", "loss", "grad_norm", "completion_len/mean"):
        assert la[1][k] == lb[0][k], k
    wa, wb = _weights(a / "model"), _weights(b / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _error(capsys, args) -> str:
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_data_errors_name_row_and_path(vl_data, tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "bad.png").write_bytes(b"not an image")
    shutil.copy(vl_data / "data" / "img" / "c0.png", d / "ok.png")
    cases = [
        ({"prompt": "<image> ?", "answer": "1", "image": "missing.png"},
         ["train row 1", "image not found", "missing.png"]),
        ({"prompt": "<image> ?", "answer": "1", "image": "bad.png"},
         ["train row 1", "not a readable image", "bad.png"]),
        ({"prompt": "<image> ?", "answer": "1", "image": ["ok.png", "ok.png"]},
         ["train row 1", "more images than image placeholders"]),
    ]
    for k, (row, want) in enumerate(cases):
        f = d / f"t{k}.jsonl"
        write_jsonl([row], f)
        args = _args(vl_data, tmp_path / f"o{k}") + ["--train-file", str(f), "--eval-file", str(f)]
        err = _error(capsys, args)
        for w in want:
            assert w in err, (w, err)
    # images given to a text-only model (the built-in one)
    f = d / "ok.jsonl"
    write_jsonl([{"prompt": "<image> ?", "answer": "1", "image": "ok.png"}], f)
    err = _error(capsys, ["--train-file", str(f), "--out-dir", str(tmp_path / "t"), "--steps", "1",
                          "--no-progress"])
    assert "train row 1" in err and "text-only" in err


def test_vllm_rollouts_refuse_llava(tmp_path):
    """vLLM serves Qwen2-VL / Qwen2.5-VL prompts (tests/test_rollout_vllm_vl.py); a LLaVA run
    is asked for --rollout hf when the run is set up, before any engine starts."""
    from fastgrpo.tasks.tiny_vl import build_tiny_vl
    from fastgrpo.trainer.config import ConfigError, TrainConfig
    from fastgrpo.trainer.vision import setup_vision

    for family, refused in (("llava", True), ("qwen2_vl", False)):
        model, tok, ip = build_tiny_vl(family)
        cfg = TrainConfig(rollout="vllm", model=str(tmp_path))
        if refused:
            with pytest.raises(ConfigError, match=r"--rollout vllm.*'llava'.*--rollout hf"):
                setup_vision(cfg, model, tok, [], [], image_processor=ip)
        else:
            assert setup_vision(cfg, model, tok, [], [], image_processor=ip).max_images == 1
