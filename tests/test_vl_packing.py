"""Packed multimodal rows == one sequence at a time (tiny random Qwen2-VL, Qwen2.5-VL, LLaVA).

One packed row holds sequences of different lengths with 0, 1 and 2 images of different sizes;
its log-probs and gradients must equal those of each sequence run alone, unpadded, through the
model's own forward (which computes its own rope positions: the oracle is independent of
fastgrpo.vl).  A negative test shows the check can fail: text positions that do not restart
let the sequences attend to each other.
"""

import pytest
import torch

from fastgrpo.hf import lm_head_weight
from fastgrpo.ops.logprobs import fused_logprobs
from fastgrpo.tasks.tiny_vl import build_tiny_vl, random_image
from fastgrpo.tasks.tokenizer import encode_prompt
from fastgrpo.trainer.attention import apply_attention, select_attention
from fastgrpo.trainer.packing import pack_bins
from fastgrpo.trainer.policy import policy_hidden_states
from fastgrpo.trainer.sample import Sample
from fastgrpo.vl import IMAGE_PLACEHOLDER, VisionAdapter, attach_vision

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava"]
ATTENTION = ["sdpa", "sdpa_varlen"]  # the dense block-diagonal mask; per-sequence SDPA (CPU auto)


def _setup(family, seed=0, attn="sdpa"):
    torch.manual_seed(seed)
    model, tok, ip = build_tiny_vl(family, seed=seed)
    model.eval()
    apply_attention(model, select_attention(attn, "cpu"))
    adapter = VisionAdapter(model.config, tok, ip)
    specs = [  # (prompt, image sizes, completion length)
        (f"What is shown in {IMAGE_PLACEHOLDER} ?", [(60, 90)], 9),
        (f"Compare {IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER} .", [(40, 40), (100, 56)], 5),
        ("Add 3 and 4 .", [], 7),                      # a text-only row in a VL batch
        ("Count the bars .", [(84, 30)], 12),          # no placeholder: the image goes first
    ]
    g = torch.Generator().manual_seed(seed)
    text_vocab = list(range(6, 140))
    samples = []
    for i, (prompt, sizes, n) in enumerate(specs):
        imgs = [random_image(w, h, seed=10 * i + j) for j, (w, h) in enumerate(sizes)]
        ids, inputs = adapter.encode(prompt, imgs, encode_prompt)
        comp = [text_vocab[int(k)] for k in torch.randint(0, len(text_vocab), (n,), generator=g)]
        samples.append(Sample(prompt_ids=ids, completion_ids=comp, group=i, row=i,
                              prompt_inputs=inputs, advantage=float(i) - 1.5))
    return model, adapter, samples


def _packed(model, adapter, samples):
    (mb,) = pack_bins([list(range(len(samples)))], samples)
    attach_vision([mb], samples, adapter, model)
    hidden, weight = policy_hidden_states(model, mb)
    logp = fused_logprobs(hidden, weight, mb.targets, backend="torch")
    out, cu = {}, mb.cu_seqlens.tolist()
    for k, i in enumerate(mb.seq_index.tolist()):
        sl = slice(cu[k], cu[k + 1])
        out[i] = logp[sl][mb.targets[sl] != -100]
    return out, mb


def _alone(model, adapter, s):
    """One sequence through the model's own forward (its own positions), no padding, under
    transformers' own sdpa attention."""
    apply_attention(model, "sdpa")
    ids = torch.tensor([s.prompt_ids + s.completion_ids])
    kw = adapter.forward_inputs(ids, s.prompt_inputs)
    hidden = model.base_model(input_ids=ids, use_cache=False, **kw).last_hidden_state[0]
    logits = hidden @ lm_head_weight(model).T
    lp = torch.log_softmax(logits.float(), -1)
    p = len(s.prompt_ids)
    t = torch.arange(p - 1, p - 1 + len(s.completion_ids))
    return lp[t, torch.tensor(s.completion_ids)]


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logprobs_equal_per_sequence(family, attn, one_thread):
    model, adapter, samples = _setup(family, attn=attn)
    assert sum(bool(s.prompt_inputs) for s in samples) == 3
    got, mb = _packed(model, adapter, samples)
    if adapter.mrope:
        assert mb.position_ids.shape == (4, 1, mb.num_tokens)
        assert mb.model_inputs["image_grid_thw"].shape == (4, 3)  # the row's 4 images, in order
    with torch.no_grad():
        for i, s in enumerate(samples):
            ref = _alone(model, adapter, s)
            assert got[i].shape == ref.shape
            torch.testing.assert_close(got[i], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_gradients_equal_per_sequence(family, attn, one_thread):
    model, adapter, samples = _setup(family, seed=1, attn=attn)
    params = [p for p in model.parameters() if p.requires_grad]
    got, _ = _packed(model, adapter, samples)
    loss = sum(got[i].sum() * s.advantage for i, s in enumerate(samples))
    g_packed = torch.autograd.grad(loss, params, allow_unused=True)
    loss_ref = sum(_alone(model, adapter, s).sum() * s.advantage for s in samples)
    g_ref = torch.autograd.grad(loss_ref, params, allow_unused=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    vision_grad = False
    for n, a, b in zip(names, g_packed, g_ref):
        assert (a is None) == (b is None), n
        if a is not None:
            # fp32 sums over the packed row run in another order: the absolute tolerance
            # scales with the gradient's size (a bias gradient of ~10 differs by ~4e-6)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()), msg=n)
            vision_grad |= ("visual" in n or "vision_tower" in n) and bool(a.abs().sum() > 0)
    assert vision_grad  # the vision tower trains by default


@pytest.mark.parametrize("family", FAMILIES)
def test_check_fails_when_positions_do_not_restart(family, one_thread):
    model, adapter, samples = _setup(family)
    (mb,) = pack_bins([list(range(len(samples)))], samples)
    attach_vision([mb], samples, adapter, model)
    L = mb.num_tokens
    if adapter.mrope:
        mb.position_ids = mb.position_ids.clone()
        mb.position_ids[0, 0] = torch.arange(L)        # text positions run on over the row
    else:
        mb.position_ids = torch.arange(L)[None]
    with torch.no_grad():
        hidden, weight = policy_hidden_states(model, mb)
        logp = fused_logprobs(hidden, weight, mb.targets, backend="torch")
        cu = mb.cu_seqlens.tolist()
        worst = 0.0
        for k, i in enumerate(mb.seq_index.tolist()):
            sl = slice(cu[k], cu[k + 1])
            ref = _alone(model, adapter, samples[i])
            worst = max(worst, float((logp[sl][mb.targets[sl] != -100] - ref).abs().max()))
    assert worst > 1e-3  # sequences now attend to each other: the equality check would fail
