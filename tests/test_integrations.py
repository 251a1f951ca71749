"""fastgrpo.integrations: TRL's GRPOTrainer with the fused loss, and the generic helpers.

TRL tests need ``trl`` (``pip install "fastgrpo[trl]"``) and are skipped without it.  Models
are tiny random Llamas built from a config and saved to a temporary directory (TRL loads its
reference model from a path); the tokenizer is a word-level one built offline.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fastgrpo import grpo_loss
from fastgrpo.integrations import (backbone_hidden_states, lm_head_weight, openrlhf_policy_loss,
                                   policy_loss, verl_policy_loss)

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(92)]   # V = 96


def _tiny_llama(tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def _assert_close(a, b, rtol=1e-5, atol=1e-6, what=""):
    err = float((a - b).detach().abs().max())
    scale = float(b.detach().abs().max())
    assert err <= atol + rtol * scale, f"{what}: max abs diff {err:.3e} (scale {scale:.3e})"


# ----------------------------------------------------------------------------- TRL


@pytest.fixture(scope="module")
def trl_env(tmp_path_factory):
    pytest.importorskip("trl")
    from datasets import Dataset

    d = tmp_path_factory.mktemp("tiny_llama")
    _tiny_llama().save_pretrained(d)
    tok = _tiny_tokenizer()
    tok.save_pretrained(d)
    ds = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6", "w7 w8 w9 w10"] * 2})
    return d, tok, ds


def _reward(completions, **kwargs):
    return [float(len(c) % 7) for c in completions]


def _config(d, **kw):
    from trl import GRPOConfig

    base = dict(output_dir=str(d / "out"), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=6, use_cpu=True, bf16=False, report_to="none",
                logging_steps=1, max_steps=1, save_strategy="no", use_bias_correction_kl=False,
                temperature=0.7, gradient_accumulation_steps=2)
    base.update(kw)
    return GRPOConfig(**base)


def _trainer(cls, env, **kw):
    d, tok, ds = env
    return cls(model=str(d), reward_funcs=_reward, args=_config(d, **kw), train_dataset=ds,
               processing_class=tok)


def _policy_logps(prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=0.7):
    """The tiny model's own completion log-probs (what TRL would record as old log-probs)."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    am = torch.cat([prompt_mask, completion_mask], 1)
    with torch.no_grad():
        logits = _tiny_llama()(input_ids=ids, attention_mask=am).logits.double()
    t = completion_ids.size(1)
    lsm = torch.log_softmax(logits[:, -t - 1:-1] / temperature, -1)
    return lsm.gather(-1, completion_ids[..., None]).squeeze(-1).float()


def _batch(seed=1, b=4, p=3, t=6, per_token_adv=False):
    """A batch shaped like ``GRPOTrainer._generate_and_score_completions``'s output."""
    g = torch.Generator().manual_seed(seed)
    v = len(WORDS)
    adv = torch.randn(b, t, generator=g) if per_token_adv else torch.tensor([1.0, -0.7, -1.2, 0.4])
    prompt_ids = torch.randint(4, v, (b, p), generator=g)
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 1, 1]])
    completion_ids = torch.randint(4, v, (b, t), generator=g)
    # full, shorter, one pad, and an empty (fully masked) completion
    completion_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [0] * 6])
    logp = _policy_logps(prompt_ids, prompt_mask, completion_ids, completion_mask)
    return dict(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
        completion_mask=completion_mask, advantages=adv,
        # off-policy by a few tenths in log-ratio: some tokens inside the clip range, some out
        old_per_token_logps=logp + 0.6 * torch.randn(b, t, generator=g),
        ref_per_token_logps=logp + 0.5 * torch.randn(b, t, generator=g),
        num_items_in_batch=torch.tensor(27.0),
    )


def _loss_and_grads(trainer, inputs, ga=2, train=True):
    trainer.current_gradient_accumulation_steps = ga
    trainer.model.train(train)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train" if train else "eval"].items()}
    return loss.detach(), grads, metrics


def _compare(ref, fast, metric_names=("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
                                      "clip_ratio/region_mean")):
    (l0, g0, m0), (l1, g1, m1) = ref, fast
    _assert_close(l1, l0, what="loss")
    assert g0.keys() == g1.keys()
    for name in g0:
        _assert_close(g1[name], g0[name], what=f"grad {name}")
    assert max(float(g.abs().max()) for g in g0.values()) > 1e-4      # a real gradient
    for k in metric_names:
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-6), k


_CASES = {
    "grpo": dict(loss_type="grpo", beta=0.1),
    "bnpo": dict(loss_type="bnpo", beta=0.1),
    "dr_grpo": dict(loss_type="dr_grpo", beta=0.1),
    "dapo": dict(loss_type="dapo", beta=0.1, epsilon_high=0.28),
    "dapo-delta-beta0": dict(loss_type="dapo", delta=1.5, epsilon_high=0.28),
    "grpo-gspo": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.1,
                      epsilon_high=0.15),
    "bnpo-entropy": dict(loss_type="bnpo", entropy_coef=0.05, beta=0.02),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_trl_loss_and_grads_match(trl_env, case):
    from trl import GRPOTrainer

    from fastgrpo.integrations.trl import FastGRPOTrainer

    kw = _CASES[case]
    inputs = _batch()
    ref = _loss_and_grads(_trainer(GRPOTrainer, trl_env, **kw), inputs)
    fast = _loss_and_grads(_trainer(FastGRPOTrainer, trl_env, **kw), inputs)
    names = ("entropy", "kl") if kw.get("beta") else ("entropy",)
    if kw.get("importance_sampling_level") != "sequence":  # TRL weights sequences there
        names += ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
    if kw.get("entropy_coef"):
        names += ("policy_loss",)
    _compare(ref, fast, names)
    assert float(ref[0]) != 0.0


def test_trl_on_policy_eval_tool_mask_and_per_token_advantages(trl_env):
    """No old log-probs (num_iterations=1), eval mode (no accumulation scaling), a tool mask
    and (B, T) advantages."""
    from trl import GRPOTrainer

    from fastgrpo.integrations.trl import FastGRPOTrainer

    inputs = _batch(per_token_adv=True)
    del inputs["old_per_token_logps"]
    inputs["tool_mask"] = torch.tensor([[1, 1, 0, 0, 1, 1]] * 4)
    for lt in ("grpo", "dapo"):
        ref = _loss_and_grads(_trainer(GRPOTrainer, trl_env, loss_type=lt), inputs, train=False)
        fast = _loss_and_grads(_trainer(FastGRPOTrainer, trl_env, loss_type=lt), inputs,
                               train=False)
        _compare(ref, fast)


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_trl_vllm_importance_sampling_correction(trl_env, mode):
    """TRL's vLLM truncated/masked IS weights, folded into per-token advantages (vLLM itself is
    not needed: the weights arrive in the batch)."""
    from trl import GRPOTrainer

    from fastgrpo.integrations.trl import FastGRPOTrainer

    inputs = _batch()
    g = torch.Generator().manual_seed(3)
    shape = (4, 6) if mode.startswith("token") else (4, 1)
    w = torch.rand(shape, generator=g) * 2
    if mode.endswith("mask"):
        w[0] = 0.0
    inputs["importance_sampling_ratio"] = w
    results = []
    for cls in (GRPOTrainer, FastGRPOTrainer):
        tr = _trainer(cls, trl_env, loss_type="bnpo", beta=0.1)
        tr.use_vllm, tr.vllm_importance_sampling_correction = True, True
        tr.vllm_importance_sampling_mode = mode
        results.append(_loss_and_grads(tr, inputs))
    _compare(*results, metric_names=("entropy", "kl"))


def test_trl_patch_grpo_trainer(trl_env):
    from trl import GRPOTrainer

    from fastgrpo.integrations.trl import FastGRPOTrainer, patch_grpo_trainer

    inputs = _batch(seed=5)
    ref = _loss_and_grads(_trainer(GRPOTrainer, trl_env, loss_type="dr_grpo", beta=0.1), inputs)
    tr = patch_grpo_trainer(_trainer(GRPOTrainer, trl_env, loss_type="dr_grpo", beta=0.1))
    assert isinstance(tr, GRPOTrainer) and type(tr).__name__ == "FastGRPOTrainer"
    assert patch_grpo_trainer(tr) is tr                     # idempotent
    _compare(ref, _loss_and_grads(tr, inputs))
    assert isinstance(_trainer(FastGRPOTrainer, trl_env), GRPOTrainer)


def test_trl_one_training_step_matches(trl_env):
    """A whole TRL training step (generation, rewards, loss, backward, SGD update): the same
    parameters come out of GRPOTrainer and FastGRPOTrainer."""
    from trl import GRPOTrainer

    from fastgrpo.integrations.trl import FastGRPOTrainer

    kw = dict(loss_type="dapo", beta=0.1, optim="sgd", learning_rate=1.0, max_grad_norm=0.0,
              gradient_accumulation_steps=1, lr_scheduler_type="constant", seed=7)
    from transformers import set_seed

    trainers = []
    for cls in (GRPOTrainer, FastGRPOTrainer):
        set_seed(7)
        trainers.append(_trainer(cls, trl_env, **kw))
        set_seed(7)                                      # same sampled completions
        trainers[-1].train()
    before = {n: p.detach().clone() for n, p in _tiny_llama().named_parameters()}
    p0 = dict(trainers[0].model.named_parameters())
    p1 = dict(trainers[1].model.named_parameters())
    moved = 0.0
    for name, p in p0.items():
        _assert_close(p1[name].detach() - before[name], p.detach() - before[name],
                      what=f"update of {name}")
        moved = max(moved, float((p.detach() - before[name]).abs().max()))
    assert moved > 0
    logs = [tr.state.log_history[0] for tr in trainers]
    for k in ("loss", "kl", "entropy", "clip_ratio/region_mean", "reward"):
        assert logs[1][k] == pytest.approx(logs[0][k], rel=1e-4, abs=1e-6), k


def test_trl_accepts_every_loss_type_and_mask(trl_env):
    """TRL 1.16's loss types and token/sequence masks build (parity: test_trl_objectives.py)."""
    from fastgrpo.integrations.trl import SUPPORTED_LOSS_TYPES, check_supported

    assert set(SUPPORTED_LOSS_TYPES) == {"grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo",
                                         "luspo", "vespo"}
    d = trl_env[0]
    for lt in SUPPORTED_LOSS_TYPES:
        check_supported(_config(d, loss_type=lt, beta=0.1, use_bias_correction_kl=True,
                                entropy_coef=0.01, top_entropy_quantile=0.2,
                                off_policy_mask_threshold=0.5, use_adaptive_entropy=True))


def test_trl_refuses_softcapped_model(trl_env):
    from trl import GRPOTrainer

    from fastgrpo.integrations.trl import patch_grpo_trainer

    tr = _trainer(GRPOTrainer, trl_env)
    tr.model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        patch_grpo_trainer(tr)


def test_trl_import_error_names_the_extra():
    code = ("import sys; sys.modules['trl'] = None\n"
            "import fastgrpo.integrations as i; print(i.policy_loss.__name__)\n"  # no TRL needed
            "try:\n    import fastgrpo.integrations.trl\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("policy_loss\n"), out.stdout
    assert 'pip install "fastgrpo[trl]"' in out.stdout, out.stdout + out.stderr


# ----------------------------------------------------------------------------- generic


def _toy(seed=0, b=3, t=7, d=16, v=50, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g, dtype=dtype)
    w = (0.5 * torch.randn(v, d, generator=g, dtype=dtype))
    y = torch.randint(0, v, (b, t), generator=g)
    mask = (torch.arange(t)[None] < torch.tensor([t, t - 3, 2])[:, None]).long()
    adv = torch.randn(b, generator=g, dtype=dtype)
    old = -4 + 0.4 * torch.randn(b, t, generator=g, dtype=dtype)
    ref = -4 + 0.4 * torch.randn(b, t, generator=g, dtype=dtype)
    return hidden, w, y, mask, adv, old, ref


def test_policy_loss_is_grpo_loss():
    h, w, y, mask, adv, old, ref = _toy()
    kw = dict(beta=0.05, loss_type="dapo", epsilon_high=0.28, delta=2.0, temperature=0.9,
              num_items_in_batch=20)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss1, m1 = policy_loss(h1, w1, y, adv, mask=mask, old_logp=old, ref_logp=ref, **kw)
    loss1.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss2, m2 = grpo_loss(h2, w2, y, adv, completion_mask=mask, old_logp=old, ref_logp=ref, **kw)
    loss2.backward()
    assert float(loss1.detach()) == float(loss2.detach())
    assert torch.equal(h1.grad, h2.grad) and torch.equal(w1.grad, w2.grad)
    assert all(isinstance(v, float) for v in m1.values())
    assert m1 == {k: float(v) for k, v in m2.items()}


def _verl_reference(logp, old, ref, adv, mask, mode, cl, ch, c, ent, ent_coef, kl_coef):
    """verl's compute_policy_loss (vanilla, dual-clip) + agg_loss + kl/entropy terms, float64."""
    def agg(x):
        m = mask.to(x.dtype)
        if mode == "token-mean":
            return (x * m).sum() / m.sum()
        if mode == "seq-mean-token-mean":
            return ((x * m).sum(-1) / m.sum(-1)).mean()
        if mode == "seq-mean-token-sum":
            return (x * m).sum(-1).mean()
        return (x * m).sum() / (m.sum(-1) > 0).sum() / m.shape[-1]   # verl >= 0.8
    a = adv[:, None].expand_as(logp)
    ratio = torch.exp(torch.clamp(logp - old, -20, 20))
    l1, l2 = -a * ratio, -a * torch.clamp(ratio, 1 - cl, 1 + ch)
    clip1 = torch.maximum(l1, l2)
    clip2 = torch.minimum(-a * c, clip1)
    pg = agg(torch.where(a < 0, clip2, clip1))
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    return pg - ent_coef * agg(ent) + kl_coef * agg(kl)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                  "seq-mean-token-sum-norm"])
def test_verl_policy_loss_vs_float64_full_logits(mode):
    """verl-style actor: backbone hidden + lm_head weight of a tiny Llama through
    verl_policy_loss, against verl's formulas on float64 full logits."""
    model = _tiny_llama(tie=True)
    g = torch.Generator().manual_seed(2)
    b, p, r = 3, 4, 5
    input_ids = torch.randint(4, len(WORDS), (b, p + r), generator=g)
    attention_mask = torch.ones(b, p + r, dtype=torch.long)
    attention_mask[0, :2] = 0                                   # left padding
    responses = input_ids[:, p:]
    response_mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    adv = torch.randn(b, generator=g)
    old = -4.6 + 0.5 * torch.randn(b, r, generator=g)
    ref = -4.6 + 0.5 * torch.randn(b, r, generator=g)
    kw = dict(cl=0.2, ch=0.28, c=3.0, ent_coef=0.01, kl_coef=0.05)

    hidden = backbone_hidden_states(model, input_ids, attention_mask)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits
    _assert_close(hidden @ lm_head_weight(model).T, full, what="hidden @ W^T vs model logits")
    assert lm_head_weight(model) is model.get_input_embeddings().weight   # tied

    h = hidden.detach().requires_grad_()
    w = lm_head_weight(model).detach().clone().requires_grad_()
    loss, metrics = verl_policy_loss(h, w, responses, response_mask, adv[:, None].expand(b, r),
                                     old, ref, loss_agg_mode=mode, clip_ratio_low=kw["cl"],
                                     clip_ratio_high=kw["ch"], clip_ratio_c=kw["c"],
                                     entropy_coeff=kw["ent_coef"], kl_loss_coef=kw["kl_coef"])
    loss.backward()

    h64 = hidden.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    logits = h64[:, p - 1:-1] @ w64.T
    lsm = torch.log_softmax(logits, -1)
    logp = lsm.gather(-1, responses[..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    ref_loss = _verl_reference(logp, old.double(), ref.double(), adv.double(), response_mask,
                               mode, ent=ent, **kw)
    ref_loss.backward()
    _assert_close(loss.double(), ref_loss.detach(), what="loss")
    _assert_close(h.grad.double(), h64.grad, what="dhidden")
    _assert_close(w.grad.double(), w64.grad, what="dW")
    m = response_mask.bool()
    assert metrics["entropy"] == pytest.approx(float(ent[m].mean().detach()), rel=1e-5)
    assert metrics["num_tokens"] == float(m.sum())


def test_openrlhf_policy_loss_matches_policy_loss():
    h, w, y, mask, adv, old, ref = _toy(t=7)
    a = 4
    seqs = torch.cat([torch.zeros(3, 3, dtype=torch.long), y[:, 3:]], 1)  # last 4 = actions
    amask = mask[:, -a:]
    for token_level, gspo in ((True, False), (False, True)):
        l1, m1 = openrlhf_policy_loss(h, w, seqs, amask, adv, old[:, -a:], ref[:, -a:],
                                      clip_eps_low=0.2, clip_eps_high=0.3, dual_clip=3.0,
                                      token_level_loss=token_level, kl_coef=0.01,
                                      policy_loss_type="gspo" if gspo else "ppo")
        l2, m2 = policy_loss(h[:, -a - 1:-1], w, y[:, -a:], adv, mask=amask, old_logp=old[:, -a:],
                             ref_logp=ref[:, -a:], epsilon_low=0.2, epsilon_high=0.3, delta=3.0,
                             beta=0.01, loss_type="bnpo" if token_level else "grpo",
                             importance_sampling_level="sequence" if gspo else "token",
                             kl_clamp=10.0,    # OpenRLHF: KL/entropy token means, k3 <= 10
                             kl_entropy_normalizer=None if token_level else float(amask.sum()),
                             num_items_in_batch=None if token_level    # non-empty rows only
                             else float((amask.sum(-1) > 0).sum()))
        assert float(l1.detach()) == float(l2.detach()) and m1 == m2
    with pytest.raises(ValueError, match="policy_loss_type"):
        openrlhf_policy_loss(h, w, seqs, amask, adv, policy_loss_type="reinforce")


def test_backbone_hidden_states_packed_and_untied():
    model = _tiny_llama(tie=False)
    assert lm_head_weight(model) is model.lm_head.weight
    ids = torch.randint(4, len(WORDS), (1, 9))
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])          # two packed sequences
    packed = backbone_hidden_states(model, ids, position_ids=pos)
    first = backbone_hidden_states(model, ids[:, :4])
    second = backbone_hidden_states(model, ids[:, 4:])
    _assert_close(packed, torch.cat([first, second], 1), rtol=1e-4, atol=1e-5, what="packed")
    am = torch.ones(1, 9, dtype=torch.long)
    am[0, :2] = 0
    _assert_close(backbone_hidden_states(model, ids, am, via_forward=True),
                  backbone_hidden_states(model, ids, am), what="via_forward")
