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
    assert A.select_attention("auto", "cpu") == "sdpa"
    assert A.select_attention("sdpa", "cpu") == "sdpa"
    assert A.select_attention("eager", "cpu") == "eager"
    assert A.available_backends("cpu")[-2:] == ["sdpa", "eager"]
    with pytest.raises(A.AttentionBackendError, match="unknown attention backend 'magic'"):
        A.select_attention("magic", "cpu")


def test_missing_or_wrong_device_messages(monkeypatch):
    monkeypatch.setattr(A, "_flash_status", lambda: "flash-attn is not installed; " + A.FLASH_INSTALL)
    with pytest.raises(A.AttentionBackendError, match="flash-attn is not installed; pip install flash-attn"):
        A.select_attention("flash_attention_2", "cpu")
    monkeypatch.setattr(A, "_flash_status", lambda: None)       # pretend it is installed
    with pytest.raises(A.AttentionBackendError, match="needs CUDA"):
        A.select_attention("flash", "cpu")
    assert A.select_attention("auto", "cpu") == "sdpa"          # never flash without CUDA
    monkeypatch.setattr(A, "_xformers_status", lambda check: "xformers is not installed; " + A.XFORMERS_INSTALL)
    with pytest.raises(A.AttentionBackendError, match="xformers is not installed; pip install xformers"):
        A.select_attention("xformers", "cpu")
    monkeypatch.setattr(A, "_xformers_status", lambda check: None)
    with pytest.raises(A.AttentionBackendError, match="needs CUDA"):
        A.select_attention("xformers", "cpu")


def test_real_import_guards():
    # in this environment neither package exists: the real checks must say so, not crash
    if A._flash_status() is not None:
        with pytest.raises(A.AttentionBackendError, match="flash-attn"):
            A.select_attention("flash_attention_2", "cpu")
    if A._xformers_status(False) is not None:
        with pytest.raises(A.AttentionBackendError, match="xformers"):
            A.select_attention("xformers", "cpu")


def test_packed_kwargs():
    cu = torch.tensor([0, 3, 7, 8], dtype=torch.int32)
    assert packed_attention_kwargs("sdpa", cu, 4) == {}
    assert packed_attention_kwargs("eager", cu) == {}
    kw = packed_attention_kwargs("flash_attention_2", cu.long())
    assert kw["max_length_q"] == kw["max_length_k"] == 4
    assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_k"].tolist() == [0, 3, 7, 8]
    assert packed_attention_kwargs("xformers", cu, 4)["max_length_k"] == 4


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
    # without cu_seq_lens: the packed mask from position ids sends it to sdpa; still correct
    n = len(fake_xformers)
    torch.testing.assert_close(_logp(model, ids, pos, tgt), ref, atol=1e-5, rtol=1e-5)
    assert len(fake_xformers) == n
    # generation with a KV cache falls back to sdpa and matches
    with torch.no_grad():
        a = model.generate(seqs[1][None], max_new_tokens=4, do_sample=False)
        b = _model("sdpa").generate(seqs[1][None], max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)
