"""LoRA in the trainer (``--lora-r``, peft): only the adapters train, the KL reference is the
base model with the adapters disabled (no copy), checkpoints hold the adapters and resume
exactly, the final ``model/`` is the merged model plus ``model/adapter``."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from fastgrpo.hf import unwrap_model  # noqa: E402
from fastgrpo.tasks.tiny_model import WARMUP_DIR, build_tiny_model  # noqa: E402
from fastgrpo.trainer import distributed as dist_  # noqa: E402
from fastgrpo.trainer.checkpoint import MODEL_FILE, STATE_FILE  # noqa: E402
from fastgrpo.trainer.config import ConfigError, parse_args  # noqa: E402
from fastgrpo.trainer.learn import _ref_logprobs, batch_logprobs, optimize  # noqa: E402
from fastgrpo.trainer.loop import main  # noqa: E402
from fastgrpo.trainer.setup import setup_run as _setup  # noqa: E402
from fastgrpo.trainer.packing import pack_sequences  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--steps", "4", "--prompts-per-step", "3", "--group-size", "3", "--eval-size", "2",
        "--eval-every", "2", "--micro-batch-tokens", "200", "--threads", "1", "--device", "cpu",
        "--no-plot", "--no-progress"]
LORA = ["--lora-r", "4", "--lora-alpha", "8", "--beta", "0.04", "--ppo-epochs", "2", "--lr", "3e-3"]
TIMING = {"gen_tokens_per_s", "train_tokens_per_s", "gen_seconds", "train_seconds", "peak_mem_mb"}


@pytest.fixture(scope="module")
def tok():
    from fastgrpo.tasks.arithmetic import build_tokenizer
    return build_tokenizer()


def _tiny(tok):
    return build_tiny_model(tok, seed=0, hidden_size=32, num_layers=2, num_heads=4)


def _batches(vocab: int, n: int = 6):
    g = torch.Generator().manual_seed(0)
    P = [torch.randint(5, vocab, (5,), generator=g).tolist() for _ in range(n)]
    C = [torch.randint(5, vocab, (7,), generator=g).tolist() for _ in range(n)]
    return pack_sequences(P, C, [1.0 if i % 2 else -1.0 for i in range(n)], max_tokens=40)


def _base_view(model) -> dict:
    """The base weights of a model with adapters, under the plain model's names."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def test_only_adapters_train_and_reference_is_the_base_without_a_copy(tok, tmp_path):
    cfg = parse_args(["--lora-r", "4", "--beta", "0.1", "--lr", "1e-2", "--warmup-steps", "0",
                      "--ppo-epochs", "2", "--out-dir", str(tmp_path), "--no-progress"])
    model = _tiny(tok)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    n_base = sum(p.numel() for p in model.parameters())
    r = _setup(cfg, model, tok, dist_.init_distributed())

    # no second copy: the reference is the peft model around the policy's own modules
    assert unwrap_model(r.model) is model and r.ref_model is r.model
    params = {id(p): p for m in (r.model, r.policy, r.ref_model) for p in m.parameters()}
    adapters = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert len(adapters) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    assert sum(p.numel() for p in params.values()) == n_base + sum(p.numel() for p in adapters.values())
    # the optimizer holds exactly the adapters; the (tied) lm_head is frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapters)
    assert {id(p) for g in r.optimizer.param_groups for p in g["params"]} == {id(p) for p in adapters.values()}
    assert not model.lm_head.weight.requires_grad

    batches = _batches(len(tok))
    optimize(r.policy, r.optimizer, batches, cfg, r.ref_model, step=1)
    m = optimize(r.policy, r.optimizer, batches, cfg, r.ref_model, step=2)

    # base weights bit-identical, adapters changed (lora_B starts at zero)
    after = _base_view(model)
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base), [k for k in base if not torch.equal(after[k], base[k])]
    assert all(p.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)

    # the reference = the untouched base model's log-probs; the policy has moved away from it
    fresh = _tiny(tok)
    want = batch_logprobs(fresh, batches, cfg)
    ref = _ref_logprobs(r.ref_model, r.policy, batches, cfg)
    pol = batch_logprobs(r.policy, batches, cfg)  # adapters enabled again after the context
    for w, got, p in zip(want, ref, pol):
        torch.testing.assert_close(got, w, rtol=0, atol=1e-6)
        assert (p - w).abs().max() > 1e-3
    assert m["kl"] > 1e-6  # the KL is computed against the adapter-free reference


def test_bad_lora_options(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"invalid --lora-r -1: must be >= 0"):
        parse_args(["--lora-r", "-1"])
    with pytest.raises(ConfigError, match=r"invalid --lora-dropout 1.0"):
        parse_args(["--lora-r", "2", "--lora-dropout", "1"])
    with pytest.raises(SystemExit) as e:
        main([*ARGS, "--lora-r", "2", "--lora-target", "q_proj,qkv_proj", "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: invalid --lora-target 'q_proj,qkv_proj': no module named 'qkv_proj'" in err
    assert "q_proj" in err.split("linear layers:")[1]  # what the model has


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """4 LoRA steps (KL and old log-probs on), a checkpoint after each."""
    out = tmp_path_factory.mktemp("lora") / "A"
    main([*ARGS, *LORA, "--save-every", "1", "--keep-last", "4", "--out-dir", str(out)])
    return out


def test_cli_run_saves_merged_model_and_adapter(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ms = _metrics(lora_run)
    assert [m["step"] for m in ms] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for m in ms for v in m.values())
    assert ms[-1]["kl"] > 0
    merged = AutoModelForCausalLM.from_pretrained(lora_run / "model")  # what --model loads
    assert not any("lora" in k or "base_layer" in k for k in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(WARMUP_DIR)
    x = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        want_base = base(x).logits
        with_adapter = PeftModel.from_pretrained(base, lora_run / "model" / "adapter")
        want = with_adapter(x).logits
        got = merged(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert (got - want_base).abs().max() > 1e-3  # the adapters did train

    # checkpoints hold the adapters and their optimizer state only
    ckpt = lora_run / "checkpoints" / "step-00000004"
    saved = load_file(str(ckpt / MODEL_FILE))
    assert saved and all(".lora_" in k for k in saved)
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    assert len(state["optimizer"]["state"]) == len(saved)


def test_resume_matches_uninterrupted(lora_run, tmp_path):
    out = tmp_path / "B"
    shutil.copytree(lora_run, out)
    shutil.rmtree(out / "model")
    for s in (3, 4):
        shutil.rmtree(out / "checkpoints" / f"step-{s:08d}")
    main([*ARGS, *LORA, "--save-every", "1", "--keep-last", "4", "--out-dir", str(out),
          "--resume", "auto"])
    a, b = _metrics(lora_run), _metrics(out)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for ma, mb in zip(a[2:], b[2:]):
        diff = {k: (ma[k], mb.get(k)) for k in ma if k not in TIMING and ma[k] != mb.get(k)}
        assert not diff, f"step {ma['step']}: {diff}"
    for f in ("model/model.safetensors", "model/adapter/adapter_model.safetensors",
              "checkpoints/step-00000004/model.safetensors"):
        wa, wb = load_file(str(lora_run / f)), load_file(str(out / f))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f
