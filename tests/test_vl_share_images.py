"""Each distinct image of a packed row is encoded once (``fastgrpo.vl.attach_vision``'s
``share_images``): the G samples of a prompt share its vision-tower output.

Oracle: every sequence alone through the model's own forward (which runs the vision tower on
its own copy of the images), in float64, plus the row packed without sharing.  Log-probs and
the gradients of every parameter (the vision tower's included) must agree; the vision tower
must see each distinct image once.
"""

import copy

import pytest
import torch

from fastgrpo.hf import lm_head_weight
from fastgrpo.tasks.tiny_vl import build_tiny_vl, random_image
from fastgrpo.tasks.tokenizer import encode_prompt
from fastgrpo.trainer.attention import apply_attention, select_attention
from fastgrpo.trainer.packing import pack_bins
from fastgrpo.trainer.policy import policy_hidden_states
from fastgrpo.trainer.sample import Sample
from fastgrpo.vl import IMAGE_PLACEHOLDER, VisionAdapter, attach_vision

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]
G = 3


def _setup(family, seed=0, attn="sdpa", dtype=torch.float64, pickled=False):
    torch.manual_seed(seed)
    model, tok, ip = build_tiny_vl(family, seed=seed)
    model.to(dtype).eval()
    apply_attention(model, select_attention(attn, "cpu"))
    adapter = VisionAdapter(model.config, tok, ip)
    prompts = [  # two prompts with images of the SAME size (different pixels), one with two
        (f"What is shown in {IMAGE_PLACEHOLDER} ?", [(56, 56)]),
        (f"Compare {IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER} .", [(56, 56), (84, 42)]),
        ("Add 3 and 4 .", []),
    ]
    g = torch.Generator().manual_seed(seed + 1)
    samples = []
    for grp, (prompt, sizes) in enumerate(prompts):
        imgs = [random_image(w, h, seed=100 * seed + 10 * grp + j) for j, (w, h) in enumerate(sizes)]
        ids, inputs = adapter.encode(prompt, imgs, encode_prompt)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        for k in range(G):
            n = 3 + int(torch.randint(0, 8, (1,), generator=g))
            comp = torch.randint(6, 140, (n,), generator=g).tolist()
            # the rollout hands every sample of a group the same dict; a copy (as after a
            # gather between ranks) must be recognised as the same image too
            inp = copy.deepcopy(inputs) if pickled and k else inputs
            adv = float(torch.randn((), generator=g))
            samples.append(Sample(prompt_ids=ids, completion_ids=comp, group=grp, row=grp,
                                  prompt_inputs=inp, advantage=adv))
    return model, adapter, samples


def _logp(hidden, weight, targets):
    lp = torch.log_softmax((hidden @ weight.T).to(torch.float64), -1)
    keep = targets != -100
    return lp[keep].gather(-1, targets[keep, None])[:, 0], keep


def _packed(model, adapter, samples, share):
    (mb,) = pack_bins([list(range(len(samples)))], samples)
    attach_vision([mb], samples, adapter, model, share_images=share)
    hidden, weight = policy_hidden_states(model, mb)
    logp, keep = _logp(hidden, weight, mb.targets)
    adv = mb.advantages[keep].to(logp.dtype)
    return logp, (logp * adv).sum(), mb


def _alone(model, adapter, s):
    """One sequence through the model's own forward: its own copy of the images, its own
    rope positions, no packing."""
    apply_attention(model, "sdpa")
    ids = torch.tensor([s.prompt_ids + s.completion_ids])
    kw = adapter.forward_inputs(ids, s.prompt_inputs)
    hidden = model.base_model(input_ids=ids, use_cache=False, **kw).last_hidden_state[0]
    p = len(s.prompt_ids)
    lp = torch.log_softmax((hidden @ lm_head_weight(model).T).to(torch.float64), -1)
    return lp[torch.arange(p - 1, p - 1 + len(s.completion_ids)), torch.tensor(s.completion_ids)]


class _CountVision:
    """Counts the vision tower's calls and the images (rows of ``grid_thw``) it encodes."""

    def __init__(self, model):
        self.calls = self.images = 0
        visual = model.model.visual
        self.handle = visual.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls += 1
        self.images += int(kwargs["grid_thw"].shape[0])

    def close(self):
        self.handle.remove()


@pytest.fixture
def vision_rotary_in_float64(monkeypatch):
    """transformers' Qwen vision towers apply their rotary embedding (and Qwen2.5-VL its
    RMSNorm) in float32 whatever the model's dtype (``apply_rotary_pos_emb_vision`` casts q, k,
    cos, sin): the backward then
    rounds the gradient to float32 there, after the G samples' gradients are summed (shared)
    or before (per sequence), ~1e-8 apart.  For a float64 comparison both paths run the same
    rotation in the model's dtype."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as m25
    from transformers.models.qwen2_vl import modeling_qwen2_vl as m2

    for mod in (m2, m25):
        def rotary(q, k, cos, sin, rotate_half=mod.rotate_half):
            cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        monkeypatch.setattr(mod, "apply_rotary_pos_emb_vision", rotary)

    def rms_norm(self, x):  # Qwen2.5-VL's RMSNorm (its vision blocks' norms) casts likewise
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(m25.Qwen2_5_VLRMSNorm, "forward", rms_norm)


@pytest.mark.parametrize("attn", ["sdpa", "sdpa_varlen"])
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_images_gradients_equal_per_sequence_float64(family, attn, one_thread,
                                                            vision_rotary_in_float64):
    model, adapter, samples = _setup(family, seed=2, attn=attn)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    logp, loss, mb = _packed(model, adapter, samples, share=True)
    assert mb.model_inputs["image_grid_thw"].shape[0] == 3          # 3 distinct images ...
    assert mb.model_inputs["image_index"].numel() == 3 * G          # ... for 9 in the row
    g_shared = torch.autograd.grad(loss, params, allow_unused=True)
    logp_u, loss_u, _ = _packed(model, adapter, samples, share=False)
    g_unshared = torch.autograd.grad(loss_u, params, allow_unused=True)
    ref = [_alone(model, adapter, s) for s in samples]
    loss_ref = sum((r * s.advantage).sum() for r, s in zip(ref, samples))
    g_ref = torch.autograd.grad(loss_ref, params, allow_unused=True)

    # log-probs in packed order against each sequence alone
    order = mb.seq_index.tolist()
    torch.testing.assert_close(logp, torch.cat([ref[i] for i in order]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logp, logp_u, rtol=1e-12, atol=1e-12)
    vision = 0
    for n, a, b, c in zip(names, g_shared, g_ref, g_unshared):
        assert (a is None) == (b is None), n
        if a is None:
            continue
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10 * scale, msg=n)
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-10 * scale, msg=n)
        if "visual" in n:
            vision += int(a.abs().sum() > 0)
    assert vision > 5  # the vision tower's parameters get gradients


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_tower_encodes_each_image_once(family, one_thread):
    model, adapter, samples = _setup(family, dtype=torch.float32, pickled=True)
    counter = _CountVision(model)
    try:
        for share, want_images in ((True, 3), (False, 3 * G)):
            counter.calls = counter.images = 0
            _, loss, _ = _packed(model, adapter, samples, share)
            loss.backward()
            assert (counter.calls, counter.images) == (1, want_images), share
        # two micro-batches: each encodes the distinct images it holds, once
        counter.calls = counter.images = 0
        bins = [[0, 1, 3, 4, 6], [2, 5, 7, 8]]   # group 0: 2 + 1, group 1: 2 + 1
        batches = pack_bins(bins, samples)
        attach_vision(batches, samples, adapter, model, share_images=True)
        for mb in batches:
            policy_hidden_states(model, mb)
        assert (counter.calls, counter.images) == (2, 3 + 3)
    finally:
        counter.close()


def test_different_images_of_one_size_stay_apart(one_thread):
    """Two prompts whose images have the same grid but different pixels: two encodings; a row
    built with the images merged gives other log-probs (the check above can fail)."""
    model, adapter, samples = _setup("qwen2_vl", dtype=torch.float32)
    first = [s for s in samples if s.group == 0][:1] + [s for s in samples if s.group == 1][:1]
    (mb,) = pack_bins([[0, 1]], first)
    attach_vision([mb], first, adapter, model, share_images=True)
    grid = mb.model_inputs["image_grid_thw"].tolist()
    assert mb.model_inputs["image_index"].tolist() == [0, 1, 2]
    i, j = [(i, j) for i in range(3) for j in range(i + 1, 3) if grid[i] == grid[j]][0]
    merged = [i if k == j else k for k in range(3)]
    with torch.no_grad():
        good = _logp(*policy_hidden_states(model, mb), mb.targets)[0]
        wrong = copy.copy(mb)
        wrong.model_inputs = dict(mb.model_inputs, image_index=torch.tensor(merged))
        bad = _logp(*policy_hidden_states(model, wrong), mb.targets)[0]
    assert (good - bad).abs().max() > 1e-4
