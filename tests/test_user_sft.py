"""SFT on a user's model and data (``python -m fastgrpo.sft --model DIR --train-file F``):
targets in each layout, the completion-only loss against a float64 reference, resume,
LoRA, the trained model taken by ``fastgrpo.train``, and the error cases (issue 30)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastgrpo.rewards import default_reward_set
from fastgrpo.rewards.free import free_reward_set
from fastgrpo.rewards.layout import TAG_LAYOUT
from fastgrpo.tasks.arithmetic import make_splits
from fastgrpo.tasks.data import write_jsonl
from fastgrpo.trainer.sft import main as sft_main
from fastgrpo.trainer.user_sft import format_target
from test_run_safety import cli

GSM = "Tom has 3 + 4 = <<3+4=7>>7 apples.\nHe eats 2: 7 - 2 = <<7-2=5>>5.\n#### 5"


def test_targets_in_each_layout_are_what_the_rewards_read():
    assert format_target(GSM, None, "") == GSM
    free = format_target(GSM, None, "free")
    assert free == "Tom has 3 + 4 = 7 apples.\nHe eats 2: 7 - 2 = 5.\n#### 5"
    r1vl = format_target(GSM, None, "r1vl")
    assert r1vl.endswith("### Step 1: Tom has 3 + 4 = 7 apples.\n### Step 2: He eats 2: 7 - 2 = 5.\n"
                         "### The final answer is: 5")
    tags = format_target(GSM, None, "tags")
    assert tags == ("<think>\nStep 1: Tom has 3 + 4 = 7 apples.\nStep 2: He eats 2: 7 - 2 = 5.\n"
                    "</think>\n<answer>5</answer>")
    # each target is valid and right under its own layout's rewards
    res = default_reward_set()(["p"], [r1vl], answer=[GSM], key_steps=[None])
    assert res.per_function["accuracy"] == [1.0] and res.per_function["step_rvr"] == [1.0]
    res = default_reward_set(TAG_LAYOUT)(["p"], [tags], answer=[GSM], key_steps=[None])
    assert res.per_function["accuracy"] == [1.0] and res.per_function["step_rvr"] == [1.0]
    assert free_reward_set()(["p"], [free], answer=[GSM]).per_function["accuracy"] == [1.0]
    # a target already in the layout stays as it is
    assert format_target(r1vl, None, "r1vl") == r1vl and format_target(tags, None, "tags") == tags
    assert format_target(r1vl, None, "tags").startswith("<think>\nStep 1: ### Rationales")
    # a plain solution with the gold answer in another column
    assert format_target("3 + 4 = 7", "7", "tags") == "<think>\nStep 1: 3 + 4 = 7\n</think>\n<answer>7</answer>"


def _data(tmp_path, n=12):
    rows = make_splits(seed=4, n_train=n, n_eval=2)[0]
    write_jsonl([{"question": r["prompt"], "solution": r["solution"], "answer": r["answer"]} for r in rows],
                tmp_path / "sft.jsonl")
    return tmp_path / "sft.jsonl", rows


def _run(capsys, *argv):
    return cli(sft_main, capsys, *argv)


BASE = ["--prompt-column", "question", "--completion-column", "solution", "--batch-size", "4",
        "--micro-batch-tokens", "256", "--lr", "1e-3", "--warmup-steps", "1", "--threads", "1",
        "--device", "cpu"]


def test_sft_loss_is_the_completion_only_cross_entropy(tmp_path, capsys):
    from fastgrpo.trainer.policy import WARMUP_DIR, load_model
    from fastgrpo.trainer.prompting import make_encoder
    from fastgrpo.trainer.prompts import PromptOrder
    path, rows = _data(tmp_path)
    code, out, err = _run(capsys, "--model", str(WARMUP_DIR), "--train-file", str(path),
                          "--out", str(tmp_path / "m"), "--steps", "1", *BASE)
    assert code == 0, err
    got = json.loads(out.strip().splitlines()[-1])["first_loss"]
    # reference: full logits in float64, cross-entropy on the target tokens (+ EOS) only
    model, tok = load_model(WARMUP_DIR)
    model = model.double().eval()
    idx = PromptOrder(len(rows), 0).take(4)
    enc = make_encoder("")
    total, count = 0.0, 0
    for i in idx:
        p = enc(tok, rows[i]["prompt"])
        c = tok(rows[i]["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        tgt = ids[0, 1:]
        lp = logp.gather(1, tgt[:, None])[:, 0][len(p) - 1:]
        total, count = total - lp.sum().item(), count + len(c)
    assert got == pytest.approx(total / count, rel=1e-4)
    # the output is a model directory fastgrpo.train takes, with the options beside it
    saved = json.loads((tmp_path / "m" / "args.json").read_text())
    assert saved["completion_column"] == "solution" and saved["steps"] == 1
    from fastgrpo.trainer.loop import main as train_main
    train_main(["--model", str(tmp_path / "m"), "--steps", "1", "--prompts-per-step", "2",
                "--group-size", "2", "--max-new-tokens", "8", "--eval-size", "1", "--no-plot",
                "--no-progress", "--no-save", "--device", "cpu", "--threads", "1",
                "--out-dir", str(tmp_path / "rl")])
    assert (tmp_path / "rl" / "summary.json").is_file()


def test_sft_resume_continues_exactly_and_lora_writes_a_merged_model(tmp_path, capsys):
    from safetensors.torch import load_file

    from fastgrpo.trainer.policy import WARMUP_DIR
    path, _ = _data(tmp_path)
    args = ["--model", str(WARMUP_DIR), "--train-file", str(path), "--steps", "4",
            "--save-every", "2", *BASE]
    code, out_a, err = _run(capsys, *args, "--out", str(tmp_path / "a"))
    assert code == 0, err
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-00000002",
                    tmp_path / "b" / "checkpoints" / "step-00000002")
    code, out_b, err = _run(capsys, *args, "--out", str(tmp_path / "b"), "--resume", "auto")
    assert code == 0 and "resuming from checkpoint" in err, err
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads(out_a.splitlines()[-1])["last_loss"] == json.loads(out_b.splitlines()[-1])["last_loss"]
    code, out, err = _run(capsys, "--model", str(WARMUP_DIR), "--train-file", str(path), "--steps", "2",
                          *BASE, "--lora-r", "4", "--lora-target", "q_proj,v_proj",
                          "--out", str(tmp_path / "lora"), "--layout", "r1vl",
                          "--eval-file", str(path), "--eval-size", "2", "--max-new-tokens", "8")
    assert code == 0, err
    summary = json.loads(out.splitlines()[-1])
    assert summary["eval_rows"] == 2 and 0 <= summary["eval_accuracy"] <= 1
    assert (tmp_path / "lora" / "adapter").is_dir()
    merged = load_file(str(tmp_path / "lora" / "model.safetensors"))
    base = load_file(str(WARMUP_DIR / "model.safetensors"))
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def test_sft_errors_exit_2_naming_the_file_and_row(tmp_path, capsys):
    from fastgrpo.trainer.policy import WARMUP_DIR
    path, _ = _data(tmp_path)
    common = ["--model", str(WARMUP_DIR), "--out", str(tmp_path / "o"), "--steps", "1", "--threads", "1"]
    code, _, err = _run(capsys, *common, "--train-file", str(tmp_path / "none.jsonl"))
    assert code == 2 and "error: data file not found" in err
    code, _, err = _run(capsys, *common, "--train-file", str(path))
    assert code == 2 and f"error: {path}:1: missing required field(s) 'prompt'" in err
    code, _, err = _run(capsys, *common, "--train-file", str(path), "--prompt-column", "question",
                        "--completion-column", "trace")
    assert code == 2 and f"error: {path}:1: no SFT target: field 'trace' (--completion-column)" in err
    code, _, err = _run(capsys, *common, "--train-file", str(path), "--steps", "0")
    assert code == 2 and "invalid --steps 0" in err
    code, _, err = _run(capsys, "--model", str(tmp_path / "nomodel"), "--out", str(tmp_path / "o"),
                        "--train-file", str(path), "--prompt-column", "question")
    assert code == 2 and "error: model directory not found" in err
