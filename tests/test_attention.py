"""Attention backend selection and packed-row equivalence on CPU (sdpa, eager, xformers path)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from fastgrpo.hf import packed_attention_kwargs
from fastgrpo.trainer import attention as A
from fastgrpo import fused_logprobs


def test_selection_on_cpu():
    assert A.select_attention("auto", "cpu") == "sdpa_varlen"     # never the dense mask by default
    assert A.select_attention("sdpa_varlen", "cpu") == "sdpa_varlen"
    assert A.select_attention("sdpa", "cpu") == "sdpa"
    assert A.select_attention("eager", "cpu") == "eager"
    assert A.available_backends("cpu") == ["sdpa_varlen", "sdpa", "eager"]
    with pytest.raises(A.AttentionBackendError, match="unknown attention backend 'magic'"):
        A.select_attention("magic", "cpu")


def test_missing_or_wrong_device_messages(monkeypatch):
    monkeypatch.setattr(A, "_flash_status", lambda: "flash-attn is not installed; " + A.FLASH_INSTALL)
    with pytest.raises(A.AttentionBackendError, match="flash-attn is not installed; pip install flash-attn"):
        A.select_attention("flash_attention_2", "cpu")
    monkeypatch.setattr(A, "_flash_status", lambda: None)       # pretend it is installed
    with pytest.raises(A.AttentionBackendError, match="needs CUDA"):
        A.select_attention("flash", "cpu")
    assert A.select_attention("auto", "cpu") == "sdpa_varlen"   # never flash without CUDA
    monkeypatch.setattr(A, "_xformers_status", lambda check: "xformers is not installed; " + A.XFORMERS_INSTALL)
    with pytest.raises(A.AttentionBackendError, match="xformers is not installed; pip install xformers"):
        A.select_attention("xformers", "cpu")
    monkeypatch.setattr(A, "_xformers_status", lambda check: None)
    with pytest.raises(A.AttentionBackendError, match="needs CUDA"):
        A.select_attention("xformers", "cpu")
    monkeypatch.setattr(A, "_torch_varlen_status", lambda check: None)
    with pytest.raises(A.AttentionBackendError, match="torch_varlen needs CUDA"):
        A.select_attention("varlen", "cpu")
    monkeypatch.setattr(A, "_torch_varlen_status", lambda check: "torch 2.9 has no torch.nn.attention.varlen")
    with pytest.raises(A.AttentionBackendError, match="torch 2.9 has no"):
        A.select_attention("torch_varlen", "cuda")


@pytest.mark.parametrize("flash,varlen,xformers,expected", [
    (True, True, True, "flash_attention_2"),
    (False, True, True, "torch_varlen"),
    (False, False, True, "xformers"),
    (False, False, False, "sdpa_varlen"),   # CUDA without any varlen kernel: still no dense mask
])
def test_auto_order_on_cuda(monkeypatch, flash, varlen, xformers, expected):
    """auto on CUDA: flash-attn, then torch's varlen_attn, then xformers, then sdpa_varlen;
    availability faked (this machine has no GPU), the choice itself real."""
    monkeypatch.setattr(A, "_flash_status", lambda: None if flash else "no flash")
    monkeypatch.setattr(A, "_torch_varlen_status", lambda check: None if varlen else "no varlen")
    monkeypatch.setattr(A, "_xformers_status", lambda check: None if xformers else "no xformers")
    assert A.select_attention("auto", "cuda") == expected
    assert A.available_backends("cuda")[0] == expected
    assert A.available_backends("cuda")[-3:] == ["sdpa_varlen", "sdpa", "eager"]
    assert A.select_attention("sdpa", "cuda") == "sdpa"      # the dense mask by name only


def test_real_import_guards():
    # in this environment neither package exists: the real checks must say so, not crash
    if A._flash_status() is not None:
        with pytest.raises(A.AttentionBackendError, match="flash-attn"):
            A.select_attention("flash_attention_2", "cpu")
    if A._xformers_status(False) is not None:
        with pytest.raises(A.AttentionBackendError, match="xformers"):
            A.select_attention("xformers", "cpu")
    if not torch.cuda.is_available():  # torch's varlen kernel is CUDA-only: the real check says so
        assert A._torch_varlen_status(True) is not None


def test_packed_kwargs():
    cu = torch.tensor([0, 3, 7, 8], dtype=torch.int32)
    assert packed_attention_kwargs("sdpa", cu, 4) == {}
    assert packed_attention_kwargs("eager", cu) == {}
    kw = packed_attention_kwargs("flash_attention_2", cu.long())
    assert kw["max_length_q"] == kw["max_length_k"] == 4
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_k"].tolist() == [0, 3, 7, 8]
    assert packed_attention_kwargs("xformers", cu, 4)["max_length_k"] == 4
    assert packed_attention_kwargs("sdpa_varlen", cu)["cu_seq_lens_q"].tolist() == [0, 3, 7, 8]


# ----------------------------------------------------------------------------- numerics

def _model(attn, kv_heads=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, intermediate_size=64,
                      max_position_embeddings=64, tie_word_embeddings=False)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def _packed():
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 61, (n,), generator=g) for n in (5, 9, 1, 7)]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    cu = torch.tensor([0] + torch.cumsum(torch.tensor([len(s) for s in seqs]), 0).tolist(),
                      dtype=torch.int32)
    tgt = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])
    return seqs, ids, pos, cu, tgt


def _logp(model, ids, pos, tgt, **kw):
    with torch.no_grad():
        h = model.base_model(input_ids=ids, position_ids=pos, use_cache=False, **kw).last_hidden_state[0]
        return fused_logprobs(h, model.get_output_embeddings().weight, tgt, backend="torch")


def _per_sequence(model, seqs):
    out = []
    for s in seqs:
        t = torch.cat([s[1:], torch.tensor([-100])])
        out.append(_logp(model, s[None], torch.arange(len(s))[None], t))
    return torch.cat(out)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_packed_logprobs_equal_per_sequence(backend):
    seqs, ids, pos, cu, tgt = _packed()
    model = _model(backend)
    A.apply_attention(model, backend)
    packed = _logp(model, ids, pos, tgt, **packed_attention_kwargs(backend, cu))
    ref = _per_sequence(_model("eager"), seqs)
    torch.testing.assert_close(packed, ref, atol=1e-5, rtol=1e-5)
    # the trap: an attention mask lets sequences see each other
    leaky = _logp(model, ids, pos, tgt, attention_mask=torch.ones_like(ids))
    assert not torch.allclose(leaky, ref, atol=1e-4)


@pytest.fixture
def fake_xformers(monkeypatch):
    """A torch stand-in for xformers.ops (same API and layout), to test the plumbing on CPU."""
    class BlockDiagonalCausalMask:
        def __init__(self, seqlens):
            self.seqlens = list(seqlens)

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen=None):
            return cls(q_seqlen)

    calls = []

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
        assert q.dim() == 4 and q.shape == k.shape == v.shape and q.shape[0] == 1  # [1, M, H, K]
        calls.append(attn_bias.seqlens)
        outs, start = [], 0
        for n in attn_bias.seqlens:
            sl = slice(start, start + n)
            o = torch.nn.functional.scaled_dot_product_attention(
                q[:, sl].transpose(1, 2), k[:, sl].transpose(1, 2), v[:, sl].transpose(1, 2),
                is_causal=True, scale=scale)
            outs.append(o.transpose(1, 2))
            start += n
        return torch.cat(outs, 1)

    root = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    fmha = types.ModuleType("xformers.ops.fmha")
    ab = types.ModuleType("xformers.ops.fmha.attn_bias")
    ops.memory_efficient_attention = memory_efficient_attention
    ab.BlockDiagonalCausalMask = BlockDiagonalCausalMask
    root.ops, ops.fmha, fmha.attn_bias = ops, fmha, ab
    for name, mod in [("xformers", root), ("xformers.ops", ops), ("xformers.ops.fmha", fmha),
                      ("xformers.ops.fmha.attn_bias", ab)]:
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_xformers_path_packed_equals_per_sequence(fake_xformers):
    seqs, ids, pos, cu, tgt = _packed()
    model = _model("sdpa")
    A.apply_attention(model, A.register_xformers())
    assert model.config._attn_implementation == "xformers"
    packed = _logp(model, ids, pos, tgt, **packed_attention_kwargs("xformers", cu))
    assert fake_xformers and fake_xformers[-1] == [5, 9, 1, 7]      # block-diagonal bias used
    ref = _per_sequence(_model("eager"), seqs)
    torch.testing.assert_close(packed, ref, atol=1e-5, rtol=1e-5)
    # without cu_seq_lens: the boundaries come from the restarting position ids
    n = len(fake_xformers)
    torch.testing.assert_close(_logp(model, ids, pos, tgt), ref, atol=1e-5, rtol=1e-5)
    assert len(fake_xformers) == n + 2 and fake_xformers[-1] == [5, 9, 1, 7]
    # generation with a KV cache falls back to sdpa and matches
    with torch.no_grad():
        a = model.generate(seqs[1][None], max_new_tokens=4, do_sample=False)
        b = _model("sdpa").generate(seqs[1][None], max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- sdpa_varlen

def _model64(family="llama", kv_heads=2, sliding=None):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM)
    kw = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=kv_heads, intermediate_size=64, max_position_embeddings=64,
              tie_word_embeddings=False)
    if family == "mistral":
        cfg, cls = MistralConfig(sliding_window=sliding, **kw), MistralForCausalLM
    else:
        cfg, cls = LlamaConfig(**kw), LlamaForCausalLM
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(int(torch.randint(0, 10_000, (1,))))
    return cls(cfg).double()


def _random_row(seed):
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 13, (5,), generator=g)]
    seqs = [torch.randint(0, 61, (n,), generator=g) for n in lens]
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    tgt = torch.cat([torch.cat([s[1:], torch.tensor([-100])]) for s in seqs])
    adv = torch.randn(len(lens), generator=g, dtype=torch.float64)
    return seqs, ids, pos, cu, tgt, adv


def _objective(model, ids, pos, tgt, weights, **kw):
    h = model.base_model(input_ids=ids, position_ids=pos, use_cache=False, **kw).last_hidden_state[0]
    logp = torch.log_softmax(h @ model.get_output_embeddings().weight.T, -1)
    keep = tgt != -100
    return logp[keep].gather(-1, tgt[keep, None])[:, 0], (logp[keep].gather(-1, tgt[keep, None])[:, 0] * weights[keep]).sum()


@pytest.mark.parametrize("family,kv_heads,sliding,seed", [
    ("llama", 2, None, 0), ("llama", 4, None, 1), ("mistral", 2, 4, 2)])
def test_sdpa_varlen_equals_per_sequence_float64(family, kv_heads, sliding, seed):
    """One packed row through sdpa_varlen == each sequence alone through transformers' own sdpa
    path (its own causal / sliding-window mask), in float64: log-probs and the gradient of
    every parameter (grouped-query and sliding-window attention included).  (transformers'
    eager attention takes its softmax in float32, so it cannot serve as a float64 oracle.)"""
    seqs, ids, pos, cu, tgt, adv = _random_row(seed)
    model = _model64(family, kv_heads, sliding)
    weights = torch.cat([torch.full((len(s),), float(a), dtype=torch.float64) for s, a in zip(seqs, adv)])
    params = [p for p in model.parameters()]
    ref_lp, ref_obj = [], 0.0
    for s, a in zip(seqs, adv):  # the oracle: one sequence at a time, no packing at all
        t = torch.cat([s[1:], torch.tensor([-100])])
        lp, obj = _objective(model, s[None], torch.arange(len(s))[None], t,
                             torch.full((len(s),), float(a), dtype=torch.float64))
        ref_lp.append(lp)
        ref_obj = ref_obj + obj
    ref_g = torch.autograd.grad(ref_obj, params)
    A.apply_attention(model, A.select_attention("auto", "cpu"))
    assert model.config._attn_implementation == "sdpa_varlen"
    for kw in (packed_attention_kwargs("sdpa_varlen", cu), {}):  # cu_seq_lens, or positions alone
        lp, obj = _objective(model, ids, pos, tgt, weights, **kw)
        torch.testing.assert_close(lp, torch.cat(ref_lp), rtol=1e-10, atol=1e-10)
        for a, b in zip(torch.autograd.grad(obj, params), ref_g):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # the check can fail: boundaries that merge two sequences let them see each other
    lens = (cu[1:] - cu[:-1]).tolist()
    merged = torch.tensor([0, lens[0] + lens[1]] + cu[3:].tolist(), dtype=torch.int32)
    lp, _ = _objective(model, ids, pos, tgt, weights, **packed_attention_kwargs("sdpa_varlen", merged))
    assert not torch.allclose(lp, torch.cat(ref_lp), atol=1e-6)


def test_sdpa_varlen_builds_no_row_mask(monkeypatch):
    """The packed row never reaches transformers' mask builder and SDPA sees one sequence at a
    time: attention costs sum(L_i^2), not L^2."""
    import transformers.masking_utils as mu
    seqs, ids, pos, cu, tgt, _ = _random_row(3)
    model = _model64().float()
    A.apply_attention(model, A.select_attention("sdpa_varlen"))
    masks, shapes = [], []
    monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **k: masks.append(1))
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        shapes.append((q.shape[2], k.shape[2], attn_mask is None, kw.get("is_causal")))
        return real(q, k, v, attn_mask=attn_mask, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        model.base_model(input_ids=ids, position_ids=pos, use_cache=False,
                         **packed_attention_kwargs("sdpa_varlen", cu))
    lens = [len(s) for s in seqs]
    assert masks == []
    assert shapes == [(n, n, True, True) for n in lens] * 2     # 2 layers, each sequence alone


def test_sdpa_varlen_generation_matches_sdpa():
    """Generation (left padding, a KV cache) goes through transformers' sdpa unchanged."""
    model = _model64().float().eval()
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(0, 61, (3, 6), generator=g)
    att = torch.ones_like(prompts)
    att[0, :2] = 0
    out = {}
    for name in ("sdpa", "sdpa_varlen"):
        A.apply_attention(model, A.select_attention(name))
        with torch.no_grad():
            out[name] = model.generate(prompts, attention_mask=att, max_new_tokens=5, do_sample=False,
                                       pad_token_id=0)
    assert torch.equal(out["sdpa"], out["sdpa_varlen"])


# ----------------------------------------------------------------------------- torch_varlen

@pytest.mark.parametrize("signature", ["window_size", "is_causal"])
def test_torch_varlen_plumbing(monkeypatch, signature):
    """torch_varlen hands varlen_attn the row as [T, H, Dh] with int32 cu_seqlens and a causal
    flag in the form of the installed torch (2.10: is_causal; later: window_size=(-1, 0)).
    varlen_attn itself is CUDA-only: a per-sequence SDPA stand-in runs it here."""
    import torch.nn.attention.varlen as V
    calls = []

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None, is_causal=None,
             enable_gqa=False):
        assert q.dim() == 3 and cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
        assert (window_size == (-1, 0)) if signature == "window_size" else is_causal is True
        calls.append(cu_q.tolist())
        outs = []
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            o = torch.nn.functional.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                is_causal=True, scale=scale, enable_gqa=enable_gqa)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setattr(V, "varlen_attn", fake)
    params = {"window_size", "enable_gqa"} if signature == "window_size" else {"is_causal"}
    monkeypatch.setattr(A, "_varlen_params", lambda: frozenset(params))
    monkeypatch.setattr(A, "_varlen_kernel_runs", lambda q: True)
    seqs, ids, pos, cu, tgt, adv = _random_row(5)
    model = _model64()
    ref = _per_sequence(model.float(), seqs)
    A.apply_attention(model, A.register_torch_varlen())
    got = _logp(model, ids, pos, tgt, **packed_attention_kwargs("torch_varlen", cu))
    assert calls and calls[-1] == cu.tolist()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
