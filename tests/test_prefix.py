"""Shared prompts (fastgrpo.trainer.prefix): a packed row whose G samples of one prompt carry it
once gives the same log-probs and gradients as each sequence alone (float64 oracle), and
actually shortens the row."""

import pytest
import torch

from fastgrpo.trainer import attention as A
from fastgrpo.trainer.packing import pack_sequences
from fastgrpo.trainer.policy import policy_hidden_states
from fastgrpo.trainer.prefix import share_prompts


def _model(kv_heads=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, intermediate_size=64,
                      max_position_embeddings=128, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).double()


def _groups(seed, n_prompts=3, g=4):
    """Prompts of random lengths, each with g completions of random lengths (one empty-ish)."""
    gen = torch.Generator().manual_seed(seed)
    P, C, adv = [], [], []
    for i in range(n_prompts):
        p = torch.randint(0, 61, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        for j in range(g):
            n = int(torch.randint(1, 10, (1,), generator=gen))
            P.append(p)
            C.append(torch.randint(0, 61, (n,), generator=gen).tolist())
            adv.append(float(torch.randn(1, generator=gen)))
    # a lone prompt, and one sequence whose completion differs only after its first token
    P.append(torch.randint(0, 61, (5,), generator=gen).tolist())
    C.append(torch.randint(0, 61, (3,), generator=gen).tolist())
    adv.append(0.7)
    return P, C, adv


def _objective(model, mb):
    hidden, weight = policy_hidden_states(model, mb)
    logp = torch.log_softmax(hidden @ weight.T, -1)
    keep = mb.targets != mb.ignore_index
    lp = logp[keep].gather(-1, mb.targets[keep, None])[:, 0]
    return lp, (lp * mb.advantages[keep].double()).sum()


@pytest.mark.parametrize("kv_heads,seed", [(2, 0), (4, 1)])
def test_shared_prompts_equal_per_sequence(kv_heads, seed, monkeypatch):
    P, C, adv = _groups(seed)
    (mb,) = pack_sequences(P, C, adv, max_tokens=10 ** 6)
    model = _model(kv_heads, seed)
    params = list(model.parameters())
    # the oracle: each sequence alone through transformers' sdpa, no packing
    ref_lp, ref_obj = [], 0.0
    for p, c, a in zip(P, C, adv):
        (one,) = pack_sequences([p], [c], [a], max_tokens=10 ** 6)
        lp, obj = _objective(model, one)
        ref_lp.append(lp)
        ref_obj = ref_obj + obj
    ref_g = torch.autograd.grad(ref_obj, params)
    ref_lp = [ref_lp[i] for i in mb.seq_index.tolist()]  # the row's order (longest first)
    A.apply_attention(model, A.select_attention("sdpa_varlen"))
    shared = share_prompts(mb)
    prompt_tokens = sum(len(p) for p in P)
    distinct = sum(len(p) for p in {tuple(p) for p in P})
    assert shared.input_ids.shape[1] == mb.num_tokens - (prompt_tokens - distinct)
    calls = []
    real = A._shared_prefix_sdpa
    monkeypatch.setattr(A, "_shared_prefix_sdpa", lambda *a: calls.append(1) or real(*a))
    lp, obj = _objective(model, mb)
    assert calls  # the shared layout ran
    torch.testing.assert_close(lp, torch.cat(ref_lp), rtol=1e-10, atol=1e-10)
    # gradients: transformers' RMSNorm runs in float32 even for a float64 model, and a shared
    # prompt row's gradient is summed before it (a copy's after), so they agree to float32
    # rounding of each tensor's scale, not to float64's
    for a, b in zip(torch.autograd.grad(obj, params), ref_g):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
    # off: the plain packed row, same numbers
    monkeypatch.setenv("FASTGRPO_SHARE_PROMPTS", "0")
    n = len(calls)
    (mb2,) = pack_sequences(P, C, adv, max_tokens=10 ** 6)
    lp2, _ = _objective(model, mb2)
    assert len(calls) == n
    torch.testing.assert_close(lp2, torch.cat(ref_lp), rtol=1e-10, atol=1e-10)


def test_shared_layout_can_fail_and_is_skipped():
    P, C, adv = _groups(3)
    (mb,) = pack_sequences(P, C, adv, max_tokens=10 ** 6)
    model = _model()
    A.apply_attention(model, A.select_attention("sdpa_varlen"))
    ref, _ = _objective(model, mb)
    # a layout that lets a completion see its siblings' tokens (one causal run over the shared
    # row) must not match: the check above can fail
    shared = share_prompts(mb)
    bad = tuple((ps, pl + sum(n for _, n in comps), ()) for ps, pl, comps in shared.groups)
    with torch.no_grad():
        h = model.base_model(input_ids=shared.input_ids, position_ids=shared.position_ids,
                             use_cache=False, shared_prefix_groups=bad).last_hidden_state[0]
        h = h.index_select(0, shared.expand)
        lp = torch.log_softmax(h @ model.lm_head.weight.T, -1)
    keep = mb.targets != -100
    assert not torch.allclose(lp[keep].gather(-1, mb.targets[keep, None])[:, 0], ref, atol=1e-6)
    # nothing to share: no layout; images or 3-D positions: left alone
    (solo,) = pack_sequences(P[-1:], C[-1:], adv[-1:], max_tokens=10 ** 6)
    assert share_prompts(solo) is None
    mb.model_inputs = {"pixel_values": torch.zeros(1)}
    assert share_prompts(mb) is None
