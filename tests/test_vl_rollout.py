"""Rollouts with images: G samples per prompt, the prompt (with its images) prefilled once and
its KV cache shared; greedy outputs equal ``model.generate``'s (the oracle), sampled tokens'
log-probs equal a full forward of the model on prompt + completion (its own positions), with
the image tokens masked (a completion never samples them)."""

import pytest
import torch

from fastgrpo.tasks.tiny_vl import build_tiny_vl, random_image
from fastgrpo.tasks.tokenizer import encode_prompt
from fastgrpo.trainer.rollout import generate
from fastgrpo.vl import IMAGE_PLACEHOLDER, VisionAdapter

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "llava"]


def _setup(family):
    model, tok, ip = build_tiny_vl(family, seed=3)
    model.eval()
    with torch.no_grad():  # sharper logits than random init: no near-ties for greedy
        norm = model.model.language_model.norm
        norm.weight.mul_(8.0)
    adapter = VisionAdapter(model.config, tok, ip)
    specs = [(f"What is in {IMAGE_PLACEHOLDER} ?", [(60, 90)]),
             ("Add 3 and 4 , then double it .", []),
             (f"{IMAGE_PLACEHOLDER} or {IMAGE_PLACEHOLDER} ?", [(40, 40), (100, 56)])]
    prompts, inputs = [], []
    for i, (text, sizes) in enumerate(specs):
        ids, inp = adapter.encode(text, [random_image(w, h, seed=i * 7 + j)
                                         for j, (w, h) in enumerate(sizes)], encode_prompt)
        prompts.append(ids)
        inputs.append(inp)
    return model, tok, adapter, prompts, inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_model_generate(family, one_thread):
    model, tok, adapter, prompts, inputs = _setup(family)
    ro = generate(model, tok, prompts, group_size=2, do_sample=False, max_new_tokens=8,
                  prompt_inputs=inputs, vision=adapter)
    for i, (p, inp) in enumerate(zip(prompts, inputs)):
        ids = torch.tensor([p])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             **adapter.forward_inputs(ids, inp), do_sample=False,
                             max_new_tokens=8, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        want = out[0, len(p):].tolist()
        if tok.eos_token_id in want:
            want = want[:want.index(tok.eos_token_id) + 1]
        for j in range(2):
            s = ro.samples[2 * i + j]
            assert s.completion_ids == want, (family, i)
            assert s.prompt_inputs is inp


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_prefill_once_with_the_images(family, one_thread):
    model, tok, adapter, prompts, inputs = _setup(family)
    calls = []
    hook = model.register_forward_pre_hook(
        lambda m, a, kw: calls.append((tuple(kw["input_ids"].shape), "pixel_values" in kw)),
        with_kwargs=True)
    try:
        torch.manual_seed(0)
        generate(model, tok, prompts, group_size=4, max_new_tokens=5, prompt_inputs=inputs,
                 vision=adapter)
    finally:
        hook.remove()
    assert calls[0] == ((3, max(map(len, prompts))), True)   # 3 prompts, images, once
    assert all(shape[1] == 1 and not pix for shape, pix in calls[1:])
    assert calls[1][0][0] == 12                              # G = 4 rows per prompt decode


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_logp_equals_a_full_forward(family, one_thread):
    model, tok, adapter, prompts, inputs = _setup(family)
    torch.manual_seed(0)
    ro = generate(model, tok, prompts, group_size=3, max_new_tokens=6, temperature=1.3,
                  prompt_inputs=inputs, vision=adapter)
    assert len(ro.samples) == 9
    for s in ro.samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():   # the model's own forward: its own mrope positions
            logits = model(input_ids=ids, **adapter.forward_inputs(ids, s.prompt_inputs)).logits
        assert not set(adapter.banned_token_ids) & set(s.completion_ids)  # never sampled
        # the policy's whole distribution (the trainer's loss; the ratio's numerator), not the
        # one renormalised without the image tokens
        lp = torch.log_softmax(logits[0].double() / 1.3, -1)
        n = len(s.prompt_ids)
        want = lp[n - 1:-1].gather(1, torch.tensor(s.completion_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(s.sampling_logp, dtype=torch.float64), want,
                                   atol=1e-4, rtol=0)
