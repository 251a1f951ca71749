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


@pytest.mark.parametrize("shaping", [{}, {"top_p": 0.9}, {"top_k": 5}, {"min_p": 0.1, "top_p": 0.8}])
def test_samples_are_grouped_and_logprobs_match_the_trainer(setup, shaping):
    """The engine's log-probs are the policy's at the temperature before top-k / top-p / min-p
    (vLLM's processed log-probs would be renormalised over the kept tokens): the importance
    ratio is 1 on-policy."""
    eng, model, tok, prompts = setup
    ro = eng.generate(prompts, group_size=4, max_new_tokens=72, temperature=1.2, **shaping)
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


def test_sampling_options_match_the_hf_engine(setup):
    """top_k, min_p, repetition_penalty and stop map onto vLLM as the hf engine applies them."""
    eng, model, tok, prompts = setup
    ids = lambda ro: [s.completion_ids for s in ro.samples]  # noqa: E731
    hf_greedy = generate(model, tok, prompts, do_sample=False, max_new_tokens=40)
    assert ids(eng.generate(prompts, group_size=1, do_sample=False, max_new_tokens=40)) == ids(hf_greedy)
    # top_k=1 sampling is greedy (at any temperature)
    assert ids(eng.generate(prompts, group_size=2, max_new_tokens=40, temperature=1.5, top_k=1)) == \
        [c for c in ids(hf_greedy) for _ in range(2)]
    # stop strings, greedy: the same completions, ended (not truncated) at the string
    stop = ["Step 2"]
    want = generate(model, tok, prompts, do_sample=False, max_new_tokens=40, stop=stop)
    got = eng.generate(prompts, group_size=1, do_sample=False, max_new_tokens=40, stop=stop)
    assert ids(got) == ids(want) and got.texts == want.texts
    assert [s.truncated for s in got.samples] == [s.truncated for s in want.samples]
    assert any("Step 2" in t for t in got.texts) and ids(got) != ids(hf_greedy)
    # repetition penalty (prompt and completion tokens) with top_k=1: the penalised argmax
    want = generate(model, tok, prompts, max_new_tokens=40, top_k=1, repetition_penalty=1.5)
    got = eng.generate(prompts, group_size=1, max_new_tokens=40, top_k=1, repetition_penalty=1.5)
    assert ids(got) == ids(want) and ids(got) != ids(hf_greedy)
    # min_p: the next token never below min_p x the most likely one's probability (both engines),
    # at a point of the warm-up model's greedy solution where it hesitates
    ctx = [prompts[0] + hf_greedy.samples[0].completion_ids[:25]]
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor(ctx)).logits[0, -1].double() / 2.0, -1)
    allowed = set((p >= 0.1 * p.max()).nonzero()[:, 0].tolist())
    assert len(allowed) > 1 and p[sorted(set(range(len(p))) - allowed)].sum() > 0.2  # can fail
    torch.manual_seed(0)
    for ro in (eng.generate(ctx, group_size=200, max_new_tokens=1, temperature=2.0, min_p=0.1),
               generate(model, tok, ctx, group_size=200, max_new_tokens=1, temperature=2.0,
                        min_p=0.1, batch_size=200)):
        first = {s.completion_ids[0] for s in ro.samples}
        assert first <= allowed and len(first) > 1


def test_auto_prefers_vllm_on_cuda_only():
    assert select_engine("auto", "cpu") == "hf" and select_engine("auto", "cuda") == "vllm"


def test_two_step_training_run_with_vllm(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastgrpo.train", "--rollout", "vllm", "--steps", "2",
                        "--prompts-per-step", "4", "--group-size", "4", "--eval-size", "4",
                        "--temperature", "1.5", "--top-p", "0.9", "--top-k", "20", "--device", "cpu",
                        "--no-plot", "--no-progress", "--no-save", "--out-dir", str(tmp_path)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2
    logged = [m for m in lines if "rollout/logp_diff_mean" in m]
    assert logged, lines  # --rollout-is auto: on for vllm, the mismatch logged
    for m in logged:  # on-policy with top-p / top-k: the ratio is 1 to float32 round-off
        assert 0 <= m["rollout/logp_diff_mean"] <= m["rollout/logp_diff_max"] < 2e-3
        assert 0 < m["rollout/is_weight_mean"] <= 2.0


def test_routing_online_turns_on_vllm_and_eval_rollout(tmp_path):
    """``--task routing --rollout-mode online`` decodes each turn on the vLLM engine; its greedy
    multi-turn eval (``--eval-rollout vllm``) equals the hf engine's on the same weights."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    common = ["--task", "routing", "--rollout-mode", "online", "--steps", "1", "--prompts-per-step", "2",
              "--group-size", "3", "--max-turns", "4", "--eval-size", "4", "--top-p", "0.9",
              "--device", "cpu", "--no-plot", "--no-progress", "--no-save", "--rollout-is", "on"]
    runs = {}
    for name, engines in (("vllm", ["--rollout", "vllm", "--eval-rollout", "hf"]),
                          ("hf", ["--rollout", "hf", "--eval-rollout", "vllm"])):
        out = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "fastgrpo.train", *common, *engines, "--out-dir", str(out)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        runs[name] = (json.loads((out / "summary.json").read_text()),
                      [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()])
    (s_v, m_v), (s_h, m_h) = runs["vllm"], runs["hf"]
    assert s_v["eval_before"] == s_h["eval_before"]  # hf greedy turns == vLLM greedy turns
    assert s_v["eval_before"]["steps"] > 1 and s_v["eval_before"]["routing_accuracy"] > 0  # multi-turn
    assert m_v[0]["kept_frac"] > 0 and m_v[0]["rewards/steps/mean"] > 1
    assert m_v[0]["rollout/logp_diff_max"] < 2e-3  # the vLLM turns' log-probs: the policy's


# --------------------------------------------------------------------------- colocated, 2 ranks

PROBE = '''
import json, os, sys
import torch
import fastgrpo.trainer.loop as T
from fastgrpo.trainer import distributed as D
from fastgrpo.trainer.rollout import Rollout, generate
from fastgrpo.trainer.sample import Sample

MODE, PATH = os.environ["PROBE_MODE"], os.environ["PROBE_FILE"]  # record | replay
FIELDS = ("prompt_ids", "completion_ids", "group", "row", "truncated", "sampling_logp", "text")
own, log = T._rollout, []


def probe(r, step):
    rank = D.dist.get_rank() if D.is_distributed() else 0
    if MODE == "replay":  # the recorded run's samples, the data order advanced as there
        r.prompts.take(r.cfg.prompts_per_step)
        rec = json.load(open(f"{PATH}.{rank}"))["steps"][len(log)]
        log.append(rec)
        return Rollout([Sample(**s) for s in rec], generated_tokens=sum(len(s["completion_ids"]) for s in rec))
    ro = own(r, step)  # the engine synced from the policy, then sampled
    with T.gather_for_generation(r.policy):  # the engine now: its greedy = the policy's
        prompts = [s.prompt_ids for s in ro.samples[::r.cfg.group_size]]
        ours = generate(r.model, r.tokenizer, prompts, do_sample=False, max_new_tokens=24)
        theirs = r.engine.generate(prompts, group_size=1, do_sample=False, max_new_tokens=24)
        diff = 0.0
        for s in ro.samples:  # the sampled tokens' log-probs: the policy's at the temperature
            with torch.no_grad():
                lp = torch.log_softmax(r.model(torch.tensor([s.prompt_ids + s.completion_ids])).logits[0].double()
                                       / r.cfg.temperature, -1)
            n = len(s.prompt_ids)
            want = lp[n - 1:-1].gather(1, torch.tensor(s.completion_ids)[:, None])[:, 0]
            diff = max(diff, (torch.tensor(s.sampling_logp, dtype=torch.float64) - want).abs().max().item())
    log.append([{k: getattr(s, k) for k in FIELDS} for s in ro.samples])
    json.dump({"steps": log, "seed": r.engine.llm.llm_engine.vllm_config.model_config.seed,
               "greedy_equal": [a.completion_ids == b.completion_ids
                                for a, b in zip(ours.samples, theirs.samples)],
               "logp_diff": diff}, open(f"{PATH}.{rank}", "w"))
    return ro


T._rollout = probe
if __name__ == "__main__":
    T.main(sys.argv[1:])
'''
TIMING = {"gen_tokens_per_s", "train_tokens_per_s", "gen_seconds", "train_seconds", "peak_mem_mb"}


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(runner, args, out, mode, probe):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PROBE_MODE=mode,
               PROBE_FILE=str(probe), VLLM_CPU_KVCACHE_SPACE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                        str(runner), *args, "--out-dir", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    assert "Traceback" not in r.stderr, r.stderr[-6000:]  # vLLM's shutdown included
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_colocated_vllm_equal_the_hf_update_on_the_same_samples(tmp_path):
    """torchrun, 2 ranks, FSDP2 (the engine synced from the gathered parameters), one vLLM
    engine per rank: each rank samples its own whole groups with its own seed from the current
    policy (the engine's greedy decode and log-probs equal the policy's after each step), and
    the update equals that of ``--rollout hf`` replaying the same samples (every metric)."""
    runner = tmp_path / "probe.py"
    runner.write_text(PROBE)
    args = ["--steps", "2", "--prompts-per-step", "4", "--group-size", "3", "--eval-size", "2",
            "--eval-every", "0", "--temperature", "1.5", "--top-p", "0.9", "--lr", "1e-3",
            "--device", "cpu", "--threads", "1", "--no-plot", "--no-progress", "--no-save",
            "--dp-strategy", "fsdp", "--rollout-is", "on"]
    probe = tmp_path / "samples"
    got = _torchrun(runner, [*args, "--rollout", "vllm"], tmp_path / "vllm", "record", probe)
    recs = [json.loads(Path(f"{probe}.{k}").read_text()) for k in (0, 1)]
    assert recs[0]["seed"] != recs[1]["seed"]
    for step in range(2):
        rows = [[s["row"] for s in rec["steps"][step]] for rec in recs]
        assert rows[0] and rows[1] and not set(rows[0]) & set(rows[1])  # each rank its own groups
        for rec, rr in zip(recs, rows):  # whole groups of G = 3
            assert len(rr) % 3 == 0 and all(len(set(rr[i:i + 3])) == 1 for i in range(0, len(rr), 3))
    for rec in recs:
        assert rec["greedy_equal"] and all(rec["greedy_equal"])
        assert rec["logp_diff"] < 2e-3  # top-p 0.9: the unnormalised distribution's log-probs
    want = _torchrun(runner, [*args, "--rollout", "hf"], tmp_path / "hf", "replay", probe)
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2]
    for a, b in zip(got, want):
        assert a["grad_norm"] > 0
        assert set(a) == set(b)
        for k in a:
            if k not in TIMING:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (a["step"], k)
    assert got[0]["rollout/logp_diff_max"] < 2e-3
