"""Rollouts: the shared-prefill hf engine against ``model.generate``, its samples' distribution
and log-probs, the engine interface, and the truncated importance-sampling correction."""

import importlib.util
import json
import math

import pytest
import torch

from fastgrpo.tasks.arithmetic import make_splits
from fastgrpo.tasks.tiny_model import build_tiny_model
from fastgrpo.tasks.tokenizer import encode_prompt
from fastgrpo.trainer.config import ConfigError, TrainConfig
from fastgrpo.trainer.correction import apply_tis, engine_logp
from fastgrpo.trainer.engines import HFEngine, make_engine, make_eval_engine, select_engine
from fastgrpo.trainer.loop import main
from fastgrpo.trainer.packing import pack_bins
from fastgrpo.trainer.policy import load_model
from fastgrpo.trainer.rollout import generate, generate_reference
from fastgrpo.trainer.sample import Sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def warmup():
    model, tok = load_model(None)
    prompts = [encode_prompt(tok, r["prompt"]) for r in make_splits(0)[1][:24]]
    return model, tok, prompts


def test_greedy_equals_model_generate(warmup):
    model, tok, prompts = warmup
    # batch_size 5: several batches, each with left padding of different widths
    new = generate(model, tok, prompts, do_sample=False, max_new_tokens=72, batch_size=5)
    ref = generate_reference(model, tok, prompts, do_sample=False, max_new_tokens=72, batch_size=5)
    assert [s.completion_ids for s in new.samples] == [s.completion_ids for s in ref.samples]
    assert [s.truncated for s in new.samples] == [s.truncated for s in ref.samples]
    assert new.texts == ref.texts and new.generated_tokens == ref.generated_tokens
    assert any(not s.truncated for s in new.samples)


def test_greedy_groups_share_the_prefill_and_equal_the_reference(tok_random):
    model, tok, prompts = tok_random
    new = generate(model, tok, prompts, group_size=3, do_sample=False, max_new_tokens=12)
    ref = generate_reference(model, tok, prompts, group_size=3, do_sample=False, max_new_tokens=12)
    assert [s.completion_ids for s in new.samples] == [s.completion_ids for s in ref.samples]
    assert [s.group for s in new.samples] == [0, 0, 0, 1, 1, 1]


@pytest.fixture(scope="module")
def tok_random():
    from fastgrpo.tasks.arithmetic import build_tokenizer
    tok = build_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2, seed=1).eval()
    with torch.no_grad():  # sharper logits than random init: temperature then matters
        model.model.norm.weight.mul_(8.0)
    prompts = [encode_prompt(tok, "12 + 7 ="), encode_prompt(tok, "3 * 4 - 5 =")]
    return model, tok, prompts


def test_prefill_once_and_finished_rows_leave_the_batch(warmup):
    model, tok, prompts = warmup
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        torch.manual_seed(0)
        ro = generate(model, tok, prompts[:4], group_size=8, max_new_tokens=72, batch_size=64)
    finally:
        hook.remove()
    width = max(len(p) for p in prompts[:4])
    assert calls[0] == (4, width)            # the 4 prompts prefilled once, not 32 times
    rows = [c[0] for c in calls[1:]]
    assert rows[0] == 32 and all(c[1] == 1 for c in calls[1:])
    assert rows == sorted(rows, reverse=True) and rows[-1] < 32   # finished rows left
    lens = sorted((len(s.completion_ids) for s in ro.samples), reverse=True)
    # each decode step runs exactly the rows still generating
    assert rows == [sum(n > t for n in lens) for t in range(1, len(rows) + 1)]


def test_sampled_tokens_follow_the_model_distribution(tok_random):
    model, tok, prompts = tok_random
    temp, n = 0.5, 4000
    torch.manual_seed(0)
    ro = generate(model, tok, prompts[:1], group_size=n, max_new_tokens=2, temperature=temp,
                  batch_size=n)
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0]])).logits[0, -1].double()
    counts = torch.bincount(torch.tensor([s.completion_ids[0] for s in ro.samples]),
                            minlength=logits.numel()).double()

    def chi2(t):  # Pearson's statistic against softmax(logits / t), cells pooled to >= 5 expected
        want = torch.softmax(logits / t, -1) * n
        small = want < 5
        o, e = [counts[~small]], [want[~small]]
        if small.any():
            o, e = o + [counts[small].sum()[None]], e + [want[small].sum()[None]]
        o, e = torch.cat(o), torch.cat(e)
        return float(((o - e) ** 2 / e).sum()), len(o) - 1

    stat, df = chi2(temp)
    assert stat < df + 5 * math.sqrt(2 * df), (stat, df)   # chi2(df): mean df, sd sqrt(2 df)
    wrong, df_w = chi2(0.7)                                   # the test can tell temperatures apart
    assert wrong > df_w + 10 * math.sqrt(2 * df_w), (wrong, df_w)
    # the G rows of one prompt sample independently
    assert len({tuple(s.completion_ids) for s in ro.samples}) > 50


def test_top_p_never_samples_outside_the_nucleus(tok_random):
    model, tok, prompts = tok_random
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([prompts[0]])).logits[0, -1].double(), -1)
    order = p.argsort(descending=True)
    nucleus = set(order[:int((p[order].cumsum(0) < 0.5).sum()) + 1].tolist())
    torch.manual_seed(0)
    ro = generate(model, tok, prompts[:1], group_size=500, max_new_tokens=1, top_p=0.5,
                  batch_size=500)
    seen = {s.completion_ids[0] for s in ro.samples}
    assert seen <= nucleus and len(seen) == len(nucleus)


def test_top_k_alone_samples_the_k_most_likely(tok_random):
    model, tok, prompts = tok_random  # top-p 1: the one-softmax fast path must not skip top-k
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([prompts[0]])).logits[0, -1].double(), -1)
    top = set(p.topk(3).indices.tolist())
    torch.manual_seed(0)
    ro = generate(model, tok, prompts[:1], group_size=300, max_new_tokens=1, top_k=3, batch_size=300)
    assert {s.completion_ids[0] for s in ro.samples} == top


@pytest.mark.parametrize("shaping", [{}, {"top_p": 0.9}, {"top_k": 5}, {"min_p": 0.1},
                                     {"repetition_penalty": 1.3, "top_p": 0.8}])
def test_sampling_logp_equals_a_full_forward(tok_random, shaping):
    """The engine's log-probs are the policy's at the temperature, before any truncation or
    penalty: the importance ratio is 1 on-policy (to float32 round-off) whatever the shaping."""
    model, tok, prompts = tok_random
    torch.manual_seed(0)
    ro = generate(model, tok, prompts, group_size=4, max_new_tokens=10, temperature=1.3, **shaping)
    for s in ro.samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double() / 1.3, -1)
        n = len(s.prompt_ids)
        want = lp[n - 1:-1].gather(1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        assert len(s.sampling_logp) == len(s.completion_ids)
        torch.testing.assert_close(torch.tensor(s.sampling_logp, dtype=torch.float64), want,
                                   atol=1e-4, rtol=0)


def test_engine_selection_and_errors(tok_random):
    model, tok, _ = tok_random
    assert select_engine("hf", "cpu") == "hf" and select_engine("auto", "cpu") == "hf"
    assert isinstance(make_engine(TrainConfig(), model, tok, "cpu"), HFEngine)
    with pytest.raises(ConfigError, match="--rollout"):
        make_engine(TrainConfig(rollout="sglang"), model, tok, "cpu")
    with pytest.raises(ConfigError, match="--rollout-is-cap"):
        make_engine(TrainConfig(rollout_is_cap=0.5), model, tok, "cpu")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ConfigError, match="--rollout vllm: vLLM is not installed"):
            make_engine(TrainConfig(rollout="vllm"), model, tok, "cpu", world_size=2)
        with pytest.raises(ConfigError, match="--eval-rollout vllm: vLLM is not installed"):
            make_eval_engine(TrainConfig(eval_rollout="vllm"), HFEngine(model, tok), model, tok, "cpu")
    hf = make_engine(TrainConfig(), model, tok, "cpu")
    assert make_eval_engine(TrainConfig(), hf, model, tok, "cpu") is hf
    assert make_eval_engine(TrainConfig(eval_rollout="hf"), hf, model, tok, "cpu") is hf


def test_tis_weights_against_float64():
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, (np_, nc) in enumerate([(3, 4), (2, 5), (4, 2)]):
        samples.append(Sample(prompt_ids=list(range(1, np_ + 1)), completion_ids=list(range(5, 5 + nc)),
                              group=0, row=i, advantage=[1.0, -0.5, 2.0][i],
                              sampling_logp=(-torch.rand(nc, generator=g, dtype=torch.float64) * 3).tolist()))
    batches = pack_bins([[0, 2], [1]], samples)
    trainer = [torch.where(mb.targets != -100, -torch.rand(mb.num_tokens, generator=g), 0.0)
               for mb in batches]
    before = [mb.advantages.clone() for mb in batches]
    m = apply_tis(batches, samples, trainer, cap=1.5)
    diffs, weights = [], []
    for mb, lp, adv0 in zip(batches, trainer, before):
        cu = mb.cu_seqlens.tolist()
        for k, i in enumerate(mb.seq_index.tolist()):  # by hand, per completion token
            s = samples[i]
            for j, e in enumerate(s.sampling_logp):
                t = cu[k] + len(s.prompt_ids) - 1 + j
                w = min(math.exp(float(lp[t].double()) - e), 1.5)
                assert float(mb.advantages[t]) == pytest.approx(s.advantage * w, rel=1e-6)
                assert float(adv0[t]) == s.advantage
                diffs.append(abs(e - float(lp[t].double())))
                weights.append(w)
        assert engine_logp(mb, samples)[mb.targets == -100].isnan().all()
    assert m["rollout/logp_diff_mean"] == pytest.approx(sum(diffs) / len(diffs), rel=1e-9)
    assert m["rollout/logp_diff_max"] == pytest.approx(max(diffs), rel=1e-9)
    assert m["rollout/is_weight_mean"] == pytest.approx(sum(weights) / len(weights), rel=1e-9)
    assert m["rollout/is_capped_frac"] == sum(w == 1.5 for w in weights) / len(weights)
    assert 0 < m["rollout/is_capped_frac"] < 1


@pytest.mark.parametrize("shaping", [[], ["--top-p", "0.9"], ["--top-k", "5"]])
def test_rollout_is_on_with_hf_logs_a_tiny_mismatch(tmp_path, shaping):
    """On-policy (the weights the samples came from), the truncated-IS ratio is 1 to float32
    round-off, with top-p / top-k too (a nucleus-renormalised log-prob would be off by the log
    of the nucleus mass: up to 0.1 at top-p 0.9)."""
    main(["--steps", "2", "--prompts-per-step", "3", "--group-size", "3", "--eval-size", "2",
          "--temperature", "1.5", "--device", "cpu", "--no-plot", "--no-progress", "--no-save",
          "--rollout-is", "on", "--out-dir", str(tmp_path), *shaping])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    stepped = [m for m in lines if "rollout/logp_diff_mean" in m]
    assert stepped, lines
    for m in stepped:  # the same model in both: only float32 round-off differs
        assert m["rollout/logp_diff_max"] < 1e-3
        assert m["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)


def test_bad_eval_rollout_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--eval-rollout", "sglang", "--steps", "1", "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    assert "error: invalid --eval-rollout 'sglang': choose one of hf, vllm, auto" in capsys.readouterr().err


def test_eval_rollout_hf_is_the_default_eval(tmp_path):
    """``--eval-rollout hf`` (the engine object the eval decodes with) gives the same held-out
    numbers as the default (the training engine, hf)."""
    common = ["--steps", "1", "--prompts-per-step", "2", "--group-size", "2", "--eval-size", "6",
              "--device", "cpu", "--no-plot", "--no-progress", "--no-save"]
    main([*common, "--out-dir", str(tmp_path / "a")])
    main([*common, "--eval-rollout", "hf", "--out-dir", str(tmp_path / "b")])
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert a["eval_before"] == b["eval_before"] and a["eval_after"] == b["eval_after"]
