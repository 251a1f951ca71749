"""Vision-language prompts on the vLLM engine (``fastgrpo.trainer.vllm_vl``): the shipped tiny
Qwen2-VL of the charts task (text and vision head_dim 32), real vLLM (``.ci/run``'s vllm leg;
skipped where vLLM is not installed).  Oracles: the hf engine (``rollout.generate``) and the
trainer's own full forward with the images."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastgrpo.trainer.vllm_vl import check_prompt_ids, vllm_prompts

REPO = Path(__file__).resolve().parents[1]


def test_prompt_collapses_image_runs_and_expanded_ids_are_checked():
    """No vLLM needed: one placeholder per image goes to vLLM; different expanded ids fail."""
    adapter = SimpleNamespace(image_token_id=7)
    ids = [1, 5, 7, 7, 7, 6, 9, 5, 7, 7, 6, 2]
    (p,) = vllm_prompts([ids], [["img0", "img1"]], adapter)
    assert p == {"prompt_token_ids": [1, 5, 7, 6, 9, 5, 7, 6, 2],
                 "multi_modal_data": {"image": ["img0", "img1"]}}
    assert vllm_prompts([[1, 2]], [[]], adapter) == [{"prompt_token_ids": [1, 2]}]
    check_prompt_ids([SimpleNamespace(prompt_token_ids=ids)], [ids])
    with pytest.raises(RuntimeError, match="image processors disagree"):
        check_prompt_ids([SimpleNamespace(prompt_token_ids=ids[:-2] + [7, 6, 2])], [ids])


if os.environ.get("FASTGRPO_REQUIRE_VLLM") == "1":  # .ci/run's vllm leg: never skip silently
    import vllm  # noqa: F401
vllm_only = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                               reason="vLLM is not installed")


@pytest.fixture(scope="module")
def setup():
    from fastgrpo.tasks.charts.data import CHARTS_WARMUP_DIR, make_splits
    from fastgrpo.tasks.tokenizer import encode_prompt
    from fastgrpo.trainer.engines import VLLMEngine
    from fastgrpo.trainer.policy import load_model
    from fastgrpo.trainer.vision import VisionRun
    from fastgrpo.vl import VisionAdapter, load_image_processor

    model, tok = load_model(CHARTS_WARMUP_DIR)
    model.eval()
    adapter = VisionAdapter(model.config, tok, load_image_processor(CHARTS_WARMUP_DIR))
    run = VisionRun(adapter, CHARTS_WARMUP_DIR)
    rows = make_splits(0)[1][:4]
    prompts, kw = run.generate_kwargs(rows, encode_prompt, images=True)
    eng = VLLMEngine(model, tok, vision=adapter, max_images=1, gpu_memory_utilization=0.1)
    return eng, model, tok, adapter, prompts, kw


@vllm_only
@pytest.mark.slow
def test_greedy_completions_equal_the_hf_engine(setup):
    from fastgrpo.trainer.rollout import generate
    eng, model, tok, adapter, prompts, kw = setup
    ours = generate(model, tok, prompts, do_sample=False, max_new_tokens=40, **{
        k: v for k, v in kw.items() if k != "images"})
    theirs = eng.generate(prompts, group_size=1, max_new_tokens=40, do_sample=False, **kw)
    # (the engine checked that vLLM's expanded prompt ids are the trainer's)
    assert [s.prompt_ids for s in theirs.samples] == prompts
    assert [s.completion_ids for s in theirs.samples] == [s.completion_ids for s in ours.samples]
    assert all(s.prompt_inputs is kw["prompt_inputs"][s.group] for s in theirs.samples)


@vllm_only
@pytest.mark.slow
def test_sampling_logprobs_match_the_trainers_forward(setup):
    eng, model, tok, adapter, prompts, kw = setup
    ro = eng.generate(prompts, group_size=4, max_new_tokens=48, temperature=1.2, **kw)
    assert [s.group for s in ro.samples] == [i for i in range(len(prompts)) for _ in range(4)]
    banned = set(adapter.banned_token_ids)
    for s in ro.samples:
        assert len(s.sampling_logp) == len(s.completion_ids) > 0
        assert not banned & set(s.completion_ids)
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids, **adapter.forward_inputs(ids, s.prompt_inputs)).logits[0]
        # the policy's whole distribution (image tokens are never sampled, but the ratio's
        # log-probs are those of the model the trainer trains: engines._policy_logprobs)
        lp = torch.log_softmax(logits / 1.2, -1)
        n = len(s.prompt_ids)
        want = lp[n - 1:-1].gather(1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.sampling_logp), want, atol=2e-3, rtol=0)


@vllm_only
@pytest.mark.slow
def test_vision_tower_weights_are_synced(setup):
    """Only the vision tower changes: vLLM's greedy output follows it after sync_weights."""
    import copy
    from fastgrpo.trainer.rollout import generate
    eng, model, tok, adapter, prompts, kw = setup
    hf_kw = {k: v for k, v in kw.items() if k != "images"}
    changed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in changed.named_parameters():
            if "visual" in n:
                p.add_(torch.randn(p.shape, generator=g) * 3 * p.std().clamp(min=1e-2))
    want = generate(changed, tok, prompts, do_sample=False, max_new_tokens=40, **hf_kw)
    before = eng.generate(prompts, group_size=1, max_new_tokens=40, do_sample=False, **kw)
    assert [s.completion_ids for s in before.samples] != [s.completion_ids for s in want.samples]
    eng.sync_weights(changed)
    try:
        after = eng.generate(prompts, group_size=1, max_new_tokens=40, do_sample=False, **kw)
        assert [s.completion_ids for s in after.samples] == [s.completion_ids for s in want.samples]
    finally:
        eng.sync_weights(model)


@vllm_only
@pytest.mark.slow
def test_charts_trains_two_steps_with_vllm(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels")]),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastgrpo.train", "--task", "charts", "--rollout",
                        "vllm", "--steps", "2", "--prompts-per-step", "2", "--group-size", "4",
                        "--eval-size", "2", "--device", "cpu", "--no-plot", "--no-progress",
                        "--no-save", "--vllm-gpu-memory-utilization", "0.1",
                        "--out-dir", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    logged = [m for m in lines if "rollout/logp_diff_mean" in m]
    assert logged, lines  # --rollout-is auto: on for vllm, the mismatch logged
    for m in logged:  # vLLM sampled from the trainer's weights, vision tower included
        assert 0 <= m["rollout/logp_diff_mean"] <= m["rollout/logp_diff_max"] < 0.05


@vllm_only
@pytest.mark.slow
def test_qwen2_5_vl_prompts_and_logprobs():
    """A tiny random Qwen2.5-VL (head_dim 32) in a process of its own (one vLLM engine per
    process): vLLM's expanded prompt ids equal the trainer's (the engine checks) and its
    sampling log-probs equal the trainer's forward with the images."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels")]),
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, __file__, "qwen2_5_vl"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["samples"] == 6 and out["tokens"] > 0
    assert out["worst_logp_diff"] < 2e-3


def _random_model_check(family: str) -> dict:
    """Sample 2 completions for each of 3 prompts with one image of different sizes from a tiny
    random ``family`` model on vLLM; the worst |logp_vllm - logp_trainer| over the tokens."""
    from fastgrpo.tasks.tiny_vl import build_tiny_vl, random_image
    from fastgrpo.tasks.tokenizer import encode_prompt
    from fastgrpo.trainer.engines import VLLMEngine
    from fastgrpo.vl import VisionAdapter

    model, tok, ip = build_tiny_vl(family, hidden_size=128, num_heads=4, vision_dim=64, seed=3)
    model.eval()
    adapter = VisionAdapter(model.config, tok, ip)
    images = [[random_image(56 + 14 * i, 70, seed=i)] for i in range(3)]
    enc = [adapter.encode("<image> What is shown ?", im, encode_prompt) for im in images]
    prompts, inputs = [e[0] for e in enc], [e[1] for e in enc]
    eng = VLLMEngine(model, tok, vision=adapter, max_images=1, gpu_memory_utilization=0.1,
                     max_model_len=1024)
    ro = eng.generate(prompts, group_size=2, max_new_tokens=16, temperature=1.0,
                      prompt_inputs=inputs, vision=adapter, images=images)
    worst, tokens = 0.0, 0
    for s in ro.samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            logits = model(input_ids=ids, **adapter.forward_inputs(ids, s.prompt_inputs)).logits[0]
        assert not set(adapter.banned_token_ids) & set(s.completion_ids)
        lp = torch.log_softmax(logits, -1)   # the policy's whole distribution
        n = len(s.prompt_ids)
        want = lp[n - 1:-1].gather(1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        worst = max(worst, float((torch.tensor(s.sampling_logp) - want).abs().max()))
        tokens += len(s.completion_ids)
    return {"samples": len(ro.samples), "tokens": tokens, "worst_logp_diff": worst}


if __name__ == "__main__":  # the engine's process for test_qwen2_5_vl_prompts_and_logprobs
    print(json.dumps(_random_model_check(sys.argv[1])))
