"""The vLLM rollout engine (skipped where vLLM is not installed; ``.ci/run``'s vllm leg runs it
in an environment of its own: README, Rollouts).  vLLM's start-up takes ~20-60 s on CPU, so one
engine serves the module."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if os.environ.get("FASTGRPO_REQUIRE_VLLM") == "1":  # .ci/run's vllm leg: never skip silently
    import vllm  # noqa: F401
pytest.importorskip("vllm")

from fastgrpo.tasks.arithmetic import make_splits  # noqa: E402
from fastgrpo.tasks.tokenizer import encode_prompt  # noqa: E402
from fastgrpo.trainer.engines import VLLMEngine, select_engine  # noqa: E402
from fastgrpo.trainer.policy import load_model  # noqa: E402
from fastgrpo.trainer.rollout import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    model, tok = load_model(None)   # the warm-up model: head_dim 32 (vLLM's CPU attention)
    prompts = [encode_prompt(tok, r["prompt"]) for r in make_splits(0)[1][:8]]
    return VLLMEngine(model, tok), model, tok, prompts


def test_samples_are_grouped_and_logprobs_match_the_trainer(setup):
    eng, model, tok, prompts = setup
    ro = eng.generate(prompts, group_size=4, max_new_tokens=72, temperature=1.2)
    assert [s.group for s in ro.samples] == [i for i in range(len(prompts)) for _ in range(4)]
    for s in ro.samples:
        assert s.prompt_ids == prompts[s.group]
        assert len(s.sampling_logp) == len(s.completion_ids) > 0
        assert s.truncated == (tok.eos_token_id not in s.completion_ids)
        assert tok.eos_token_id not in s.completion_ids[:-1]
        with torch.no_grad():  # the engine's log-probs: the trainer's model at temperature 1.2
            lp = torch.log_softmax(model(torch.tensor([s.prompt_ids + s.completion_ids])).logits[0] / 1.2, -1)
        n = len(s.prompt_ids)
        want = lp[n - 1:-1].gather(1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.sampling_logp), want, atol=2e-3, rtol=0)


def test_weights_after_sync_equal_the_trainers(setup):
    eng, model, tok, prompts = setup
    changed = load_model(None)[0]
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = generate(changed, tok, prompts, do_sample=False, max_new_tokens=40)
    before = eng.generate(prompts, group_size=1, max_new_tokens=40, do_sample=False)
    assert [s.completion_ids for s in before.samples] != [s.completion_ids for s in ours.samples]
    eng.sync_weights(changed)
    after = eng.generate(prompts, group_size=1, max_new_tokens=40, do_sample=False)
    assert [s.completion_ids for s in after.samples] == [s.completion_ids for s in ours.samples]
    eng.sync_weights(model)
    back = eng.generate(prompts, group_size=1, max_new_tokens=40, do_sample=False)
    assert [s.completion_ids for s in back.samples] == [s.completion_ids for s in before.samples]


def test_auto_prefers_vllm_on_cuda_only():
    assert select_engine("auto", "cpu") == "hf" and select_engine("auto", "cuda") == "vllm"


def test_two_step_training_run_with_vllm(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastgrpo.train", "--rollout", "vllm", "--steps", "2",
                        "--prompts-per-step", "4", "--group-size", "4", "--eval-size", "4",
                        "--temperature", "1.5", "--device", "cpu", "--no-plot", "--no-progress",
                        "--no-save", "--out-dir", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    logged = [m for m in lines if "rollout/logp_diff_mean" in m]
    assert logged, lines  # --rollout-is auto: on for vllm, the mismatch logged
    for m in logged:
        assert 0 <= m["rollout/logp_diff_mean"] <= m["rollout/logp_diff_max"] < 0.05
        assert 0 < m["rollout/is_weight_mean"] <= 2.0
