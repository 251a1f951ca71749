"""A vision-language run under ``torchrun --nproc-per-node 2`` (gloo, CPU) computes the same
training run as one process on the same global batch: same metrics, same final weights (vision
tower included), one checkpoint with both ranks' RNG states.  The vision-language twin of
``tests/test_train_distributed.py``, on a tiny random Qwen2-VL and a JSONL of Pillow images
(one image, two images of different sizes, a text-only row).

As there, the launcher script (test code) seeds each prompt group's sampling from the prompt
itself so the rollouts do not depend on how groups are split over ranks; it passes each
prompt's own image inputs to the rollout.  Everything after the rollout is the trainer's path:
gather, length-balanced packing over ranks (pixel values and mrope positions travel with their
samples), global normalizer, DDP gradient sync.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastgrpo.tasks.data import write_jsonl
from fastgrpo.tasks.tiny_vl import save_tiny_vl
from test_train_distributed import _free_port, _run   # the same torchrun harness as the text test

REPO = Path(__file__).resolve().parents[1]
TIMING = {"gen_tokens_per_s", "train_tokens_per_s", "gen_seconds", "train_seconds", "peak_mem_mb"}

REWARD = '''
def reward(prompts, completions, **kw):
    return [float(sum(map(ord, c)) % 7) for c in completions]
'''

RUNNER = '''
import sys, zlib
import torch
import fastgrpo.trainer.loop as T
import fastgrpo.trainer.rollout as R
from fastgrpo.trainer.rollout import Rollout, generate

calls = [0]

def seeded_generate(model, tokenizer, prompt_ids, **kw):
    calls[0] += bool(kw.get("do_sample", True))  # eval (greedy) runs on rank 0 only
    inputs = kw.pop("prompt_inputs", None)
    out = Rollout()
    for i, p in enumerate(prompt_ids):
        torch.manual_seed(zlib.crc32(repr((calls[0], p)).encode()))
        r = generate(model, tokenizer, [p], prompt_inputs=None if inputs is None else inputs[i:i + 1], **kw)
        for s in r.samples:
            s.group = s.row = i
        out.samples += r.samples
        out.seconds += r.seconds; out.generated_tokens += r.generated_tokens
    return out

R.generate = seeded_generate  # what the hf rollout engine calls
T.main(sys.argv[1:])
'''


def _draw(path: Path, bars: list[int], size):
    from PIL import Image, ImageDraw
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    w = size[0] // len(bars)
    for k, h in enumerate(bars):
        d.rectangle([k * w + 2, size[1] - h, k * w + w - 2, size[1] - 1], fill=(40 * k, 90, 200))
    im.save(path)


@pytest.fixture(scope="module")
def vl_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("vldist")
    save_tiny_vl(root / "model", "qwen2_vl", seed=0)
    (root / "data" / "img").mkdir(parents=True)
    for k in range(4):
        _draw(root / "data" / "img" / f"c{k}.png", [5 + 7 * k, 20, 30 - 5 * k], (56 + 14 * k, 42))
    rows = [{"prompt": "<image> Which bar is tallest ?", "answer": "1", "image": "img/c0.png"},
            {"prompt": "Compare <image> and <image> .", "answer": "2",
             "image": ["img/c1.png", "img/c2.png"]},
            {"prompt": "Add 3 and 4 .", "answer": "7"},              # text-only row
            {"prompt": "How many bars ?", "answer": "3", "image": ["img/c3.png"]}]
    write_jsonl(rows, root / "data" / "train.jsonl")
    write_jsonl(rows[:1], root / "data" / "eval.jsonl")
    (root / "reward.py").write_text(REWARD)
    return root


def _args(root: Path) -> list[str]:
    return ["--model", str(root / "model"), "--train-file", str(root / "data" / "train.jsonl"),
            "--eval-file", str(root / "data" / "eval.jsonl"), "--rewards", f"{root / 'reward.py'}:reward",
            "--steps", "2", "--prompts-per-step", "4", "--group-size", "3", "--eval-size", "1",
            "--max-new-tokens", "6", "--temperature", "1.5", "--micro-batch-tokens", "96",
            "--lr", "1e-3", "--warmup-steps", "0", "--device", "cpu", "--threads", "1",
            "--no-drop-zero-std-groups", "--no-mask-truncated", "--no-plot", "--no-progress",
            "--save-every", "2"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_vl_two_processes_equal_one_process(tmp_path, vl_root, strategy):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, str(runner), *_args(vl_root), "--out-dir", str(one)])
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
              "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
              str(runner), *_args(vl_root), "--out-dir", str(two), "--dp-strategy", strategy])
    assert r.stdout.count("held-out greedy") == 1  # rank 0 alone reports

    m1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in m2] == [1, 2]
    for a, b in zip(m1, m2):
        assert a["kept_frac"] > 0 and a["grad_norm"] > 0  # the step really trained
        for k in a:
            if k in TIMING or k == "micro_batches":  # micro-batches are per rank
                continue
            assert abs(a[k] - b[k]) <= 1e-5 + 1e-4 * abs(a[k]), (a["step"], k, a[k], b[k])
    assert m2[0]["micro_batches"] <= m1[0]["micro_batches"]

    w0 = load_file(str(vl_root / "model" / "model.safetensors"))
    w1, w2 = (load_file(str(d / "model" / "model.safetensors")) for d in (one, two))
    for part in ("visual.", "model.layers."):  # both towers trained, alike
        keys = [k for k in w1 if part in k]
        assert keys, part
        moved = max((w1[k] - w0[k]).abs().max().item() for k in keys)
        diff = max((w1[k] - w2[k]).abs().max().item() for k in keys)
        assert moved > 1e-4 and diff < 3e-5, (part, moved, diff)
    # rank 0 wrote the checkpoint (one copy, image processor included), with both ranks' RNG states
    ck = two / "checkpoints" / "step-00000002"
    state = torch.load(ck / "trainer_state.pt", weights_only=False)
    assert len(state["rng"]) == 2
    assert (ck / "preprocessor_config.json").is_file()
    # the checkpoint holds the module's own key names (model.language_model.*, model.visual.*),
    # save_pretrained the checkpoint layout of the Hub (model.*, visual.*); same tensors
    w_ck = {_hub_key(k): v for k, v in load_file(str(ck / "model.safetensors")).items()}
    assert set(w_ck) == set(w2)
    assert all(torch.equal(w_ck[k], w2[k]) for k in w_ck)


def _hub_key(k: str) -> str:
    for a, b in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if k.startswith(a):
            return b + k[len(a):]
    return k
