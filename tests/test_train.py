"""The StepGRPO trainer: short CPU runs on tiny random models (no downloads)."""

import json
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastgrpo.trainer.config import ConfigError, TrainConfig, parse_args
from fastgrpo.ops.loss import grpo_loss
from fastgrpo.tasks.tiny_model import build_tiny_model
from fastgrpo.trainer.packing import pack_sequences
from fastgrpo.tasks.arithmetic import make_splits
from fastgrpo.tasks.data import DataError, write_jsonl
from fastgrpo.trainer.learn import batch_logprobs, lr_at, num_items, optimize
from fastgrpo.trainer.loop import main, run
from fastgrpo.trainer.policy import policy_hidden_states


@pytest.fixture(scope="module")
def tok():
    from fastgrpo.tasks.arithmetic import build_tokenizer
    return build_tokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(tok=None, vocab=None, **kw):
    kw = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, **kw}
    return build_tiny_model(tok, vocab_size=vocab, seed=0, **kw)


def _batch(vocab, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = [torch.randint(5, vocab, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
         for _ in range(n)]
    C = [torch.randint(5, vocab, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
         for _ in range(n)]
    adv = [1.0 if i % 2 == 0 else -1.0 for i in range(n)]
    return P, C, adv


def test_loss_decreases_on_fixed_batch():
    model = _tiny(vocab=64)
    cfg = TrainConfig(lr=1e-2, warmup_steps=0)
    P, C, adv = _batch(64)
    batches = pack_sequences(P, C, adv, max_tokens=40)
    old = batch_logprobs(model, batches, cfg)  # fixed behaviour policy: the loss now moves
    for mb, lp in zip(batches, old):
        mb.extras["old_logp"] = lp
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    losses = [optimize(model, opt, batches, cfg)["loss"] for _ in range(6)]
    assert losses[0] == pytest.approx(-sum(adv) / len(adv), abs=1e-5)  # ratio 1 at the start
    assert losses[-1] < losses[0] - 0.05


def _grads_for(model, batches, cfg):
    model.zero_grad(set_to_none=True)
    n = num_items(batches, cfg)
    for mb in batches:
        h, w = policy_hidden_states(model, mb, bf16=cfg.bf16)
        loss, _ = grpo_loss(h, w, mb.targets, mb.advantages, cu_seqlens=mb.cu_seqlens,
                            loss_type=cfg.loss_type, num_items_in_batch=n)
        loss.backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_packed_gradient_independent_of_micro_batching(loss_type):
    """Whole-batch normalisation: one big row, many small rows, one row per sequence -> same grads."""
    model = _tiny(vocab=64)
    cfg = TrainConfig(loss_type=loss_type)
    P, C, adv = _batch(64, n=8, seed=3)
    ref = _grads_for(model, pack_sequences(P, C, adv, 10 ** 6), cfg)
    for budget in (30, 1):
        batches = pack_sequences(P, C, adv, budget)
        assert len(batches) > 1
        got = _grads_for(model, batches, cfg)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-6, rtol=1e-4)


class _MaxNumel(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel, self.op = t.numel(), func
        return out


def test_train_step_never_calls_lm_head_nor_allocates_n_by_v():
    V = 65536  # N * V well above the fused kernel's fixed block workspace (2**24 elements)
    model = _tiny(vocab=V, hidden_size=16, num_layers=1, num_heads=2)
    P, C, adv = _batch(V, n=40, seed=1)
    batches = pack_sequences(P, C, adv, max_tokens=10 ** 6)
    N = sum(mb.num_tokens for mb in batches)
    assert N * V > 2 ** 24 * 1.5

    def boom(*a, **k):
        raise AssertionError("lm_head forward called in the training step")

    import copy
    ref = copy.deepcopy(model)
    model.lm_head.forward = boom
    ref.lm_head.forward = boom
    cfg = TrainConfig(ppo_epochs=2, beta=0.04, lr=1e-3)  # old and ref log-probs too
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    with _MaxNumel() as mode:
        m = optimize(model, opt, batches, cfg, ref_model=ref)
    assert math.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert mode.max_numel < N * V, f"{mode.op} produced {mode.max_numel} elements (N*V = {N * V})"


REQUIRED = ["step", "lr", "reward/mean", "reward/std", "accuracy", "step_k", "validity", "kl",
            "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "entropy", "loss", "grad_norm",
            "completion_len/mean", "completion_len/max", "gen_tokens_per_s", "train_tokens_per_s",
            "peak_mem_mb", "rewards/step_rar/mean", "rewards/step_rar/std", "rewards/step_rvr/mean",
            "rewards/step_rvr/std", "rewards/accuracy/mean", "rewards/step_k/mean"]


def test_run_writes_finite_metrics(tok, tmp_path, capsys):
    model = _tiny(tok)
    cfg = parse_args(["--steps", "2", "--prompts-per-step", "2", "--group-size", "3",
                      "--max-new-tokens", "12", "--eval-size", "3", "--eval-every", "1",
                      "--sample-every", "1", "--out-dir", str(tmp_path), "--no-mask-truncated",
                      "--no-drop-zero-std-groups", "--beta", "0.04", "--ppo-epochs", "2",
                      "--micro-batch-tokens", "64", "--no-progress", "--gradient-checkpointing"])
    summary = run(cfg, model, tok)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    out = capsys.readouterr().out
    for line in lines:
        m = json.loads(line)
        assert f"step {m['step']}/2  reward " in out and line not in out  # JSON: the file only
        missing = [k for k in REQUIRED if k not in m]
        assert not missing, missing
        bad = {k: v for k, v in m.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
        assert not bad, bad
        assert m["micro_batches"] >= 2
    assert "eval/accuracy" in json.loads(lines[0])
    assert set(summary["eval_before"]) == {"accuracy", "validity"}
    assert "before training" in out and "after  training" in out
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "model" / "config.json").is_file()
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2


def test_custom_reward_and_jsonl_data(tok, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length_reward(prompts, completions, **kw):\n"
        "    return [len(c) / 100 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    train, evals = make_splits(seed=5, n_train=6, n_eval=2)
    write_jsonl(train, tmp_path / "train.jsonl")
    write_jsonl(evals, tmp_path / "eval.jsonl")
    cfg = parse_args(["--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
                      "--max-new-tokens", "8", "--train-file", str(tmp_path / "train.jsonl"),
                      "--eval-file", str(tmp_path / "eval.jsonl"), "--out-dir", str(tmp_path / "o"),
                      "--reward", "my_rewards:length_reward=0.5", "--no-plot", "--no-save",
                      "--no-progress", "--no-mask-truncated"])
    summary = run(cfg, _tiny(tok), tok)
    m = summary["last"]
    assert "rewards/length_reward/mean" in m
    # total = step_rar + step_rvr + 0.5 * length (the task rewards are 0 for a random model)
    assert m["reward/mean"] == pytest.approx(0.5 * m["rewards/length_reward/mean"], abs=1e-6)


def test_rewards_option_replaces_the_set(tok, tmp_path, monkeypatch):
    """--rewards picks the training reward (outcome-only GRPO here, plus a weighted file
    function); accuracy / step_rvr / step_k are still logged, with weight 0."""
    (tmp_path / "lenrew.py").write_text(
        "def length_reward(prompts, completions, **kw):\n"
        "    return [len(c) / 100 for c in completions]\n")
    train, evals = make_splits(seed=5, n_train=6, n_eval=2)
    write_jsonl(train, tmp_path / "train.jsonl")
    cfg = parse_args(["--steps", "1", "--prompts-per-step", "2", "--group-size", "2",
                      "--max-new-tokens", "8", "--train-file", str(tmp_path / "train.jsonl"),
                      "--out-dir", str(tmp_path / "o"), "--no-plot", "--no-save", "--no-progress",
                      "--rewards", f"accuracy=2,{tmp_path / 'lenrew.py'}:length_reward=0.25",
                      "--no-mask-truncated", "--eval-size", "1"])
    m = run(cfg, _tiny(tok), tok)["last"]
    assert {"rewards/accuracy/mean", "rewards/step_rvr/mean", "rewards/step_k/mean",
            "rewards/length_reward/mean"} <= set(m)
    assert "rewards/step_rar/mean" not in m
    expected = 2 * m["rewards/accuracy/mean"] + 0.25 * m["rewards/length_reward/mean"]
    assert m["reward/mean"] == pytest.approx(expected, abs=1e-6)


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_steps=2, steps=12, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(12)]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] >= 0.1 and lrs[-1] < 0.15


@pytest.mark.parametrize("argv, message", [
    (["--lr=-1e-6"], "invalid --lr -1e-06: must be > 0"),
    (["--group-size", "1"], "invalid --group-size 1: must be >= 2"),
    (["--loss-type", "ppo"], "invalid --loss-type 'ppo': unknown loss type; choose one of grpo"),
    (["--reward", "nocolon"], "invalid --reward 'nocolon'"),
    (["--rewards", "accuracy,stepgrpo"], "invalid --rewards 'accuracy,stepgrpo': unknown reward 'stepgrpo'"),
    (["--rewards", "accuracy=inf"], "invalid --rewards 'accuracy=inf'"),
    (["--save-every", "-1"], "invalid --save-every -1: must be >= 0"),
    (["--keep-last", "0"], "invalid --keep-last 0: must be >= 1"),
    (["--dp-strategy", "zero3"], "invalid --dp-strategy 'zero3': choose one of auto, ddp, fsdp"),
    (["--attn-implementation", "flash3"], "invalid --attn-implementation 'flash3': unknown attention backend"),
    (["--preset", "gpt5"], "invalid --preset 'gpt5': unknown preset; choose one of smollm2-135m"),
])
def test_bad_config_values(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert message in str(e.value)


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.01\ngroup-size = 4\nplot = false\nreward = ["m:f=2"]\n')
    cfg = parse_args(["--config", str(f), "--lr", "0.5"])
    assert (cfg.lr, cfg.group_size, cfg.plot, cfg.reward) == (0.5, 4, False, ["m:f=2"])
    f.write_text("lr = 0.01\nbogus = 1\n")
    with pytest.raises(ConfigError, match="c.toml: unknown key 'bogus'"):
        parse_args(["--config", str(f)])
    f.write_text('group_size = "many"\n')
    with pytest.raises(ConfigError, match="invalid --group-size 'many': expected int"):
        parse_args(["--config", str(f)])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_args(["--config", str(tmp_path / "none.toml")])
    y = tmp_path / "c.yaml"
    y.write_text("steps: 7\n")
    try:
        import yaml  # noqa: F401
        assert parse_args(["--config", str(y)]).steps == 7
    except ImportError:
        with pytest.raises(ConfigError, match="PyYAML"):
            parse_args(["--config", str(y)])


def test_new_options_in_help_and_preset_keeps_explicit_values(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    for flag in ("--save-every", "--keep-last", "--resume", "--attn-implementation", "--preset",
                 "--dp-strategy"):
        assert flag in out, flag
    from fastgrpo.trainer.config import explicit_fields
    from fastgrpo.trainer.presets import apply_preset
    cfg = parse_args(["--preset", "smollm2-135m", "--lr", "0.01", "--steps", "60"])
    assert explicit_fields(cfg) == {"preset", "lr", "steps"}
    assert explicit_fields(TrainConfig(group_size=4)) == {"group_size"}  # built in code
    got = apply_preset(cfg, cfg.preset, explicit=explicit_fields(cfg), resolve_model=False)
    assert (got.lr, got.steps, got.max_new_tokens) == (0.01, 60, 256)


def test_every_option_has_help():
    from fastgrpo.trainer.config import _build_parser
    for action in _build_parser()._actions:
        assert action.help, action.dest


def test_cli_errors_missing_file_and_bad_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--train-file", str(tmp_path / "missing.jsonl"), "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    assert "data file not found" in capsys.readouterr().err
    bad = tmp_path / "train.jsonl"
    bad.write_text('{"prompt": "p", "answer": "1"}\n{"prompt": "q" "answer": 2}\n')
    with pytest.raises(DataError, match=r"train.jsonl:2: malformed JSON line"):
        run(parse_args(["--train-file", str(bad), "--out-dir", str(tmp_path)]))
    with pytest.raises(SystemExit):
        main(["--lr", "0", "--out-dir", str(tmp_path)])
    assert "invalid --lr 0.0: must be > 0" in capsys.readouterr().err
