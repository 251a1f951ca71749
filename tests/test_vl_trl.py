"""FastGRPOTrainer on TRL's vision-language batch layout, against TRL's own loss.

TRL 1.16's GRPOTrainer builds for a tiny random Qwen2-VL with its tokenizer as the processing
class (the full Processor cannot be built here: torchvision); its generation path would need the
processor, so the batch is built by hand in the layout ``_generate_and_score_completions``
returns: left-padded prompts with expanded image tokens, ``pixel_values`` of all images in
order, ``image_grid_thw``, ``num_images``, ``mm_token_type_ids`` over prompt + completion.
Loss and gradients (vision tower included) must equal TRL's own ``_compute_loss``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from fastgrpo.tasks.tiny_vl import build_tiny_vl, random_image  # noqa: E402
from fastgrpo.tasks.tokenizer import encode_prompt  # noqa: E402
from fastgrpo.vl import IMAGE_PLACEHOLDER, VisionAdapter, concat_inputs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from datasets import Dataset
    d = tmp_path_factory.mktemp("tiny_qwen2_vl")
    model, tok, ip = build_tiny_vl("qwen2_vl", seed=0)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    ds = Dataset.from_dict({"prompt": ["Add 3 and 4 ."] * 8})
    return d, tok, ds, VisionAdapter(model.config, tok, ip)


def _trainer(cls, env, **kw):
    from trl import GRPOConfig
    d, tok, ds, _ = env
    args = GRPOConfig(output_dir=str(d / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, use_cpu=True, bf16=False, report_to="none",
                      max_steps=1, save_strategy="no", temperature=0.7,
                      use_bias_correction_kl=False, **kw)
    return cls(model=str(d), reward_funcs=lambda completions, **k: [0.0] * len(completions),
               args=args, train_dataset=ds, processing_class=tok)


def _batch(adapter, seed=0):
    specs = [(f"{IMAGE_PLACEHOLDER} what ?", [(60, 90)]), ("Add 3 and 4 .", []),
             (f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER} ?", [(40, 40), (100, 56)]),
             ("Count the bars .", [(84, 30)])]
    enc = [adapter.encode(t, [random_image(w, h, seed=7 * i + j) for j, (w, h) in enumerate(s)],
                          encode_prompt) for i, (t, s) in enumerate(specs)]
    b, p, t = len(enc), max(len(e[0]) for e in enc), 6
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.zeros(b, p, dtype=torch.long)
    prompt_mask = torch.zeros(b, p, dtype=torch.long)
    for i, (ids, _) in enumerate(enc):
        prompt_ids[i, p - len(ids):] = torch.tensor(ids)
        prompt_mask[i, p - len(ids):] = 1
    completion_ids = torch.randint(6, 140, (b, t), generator=g)
    completion_mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 5 + [0], [1] * 6])
    full = torch.cat([prompt_ids, completion_ids], 1)
    mm = concat_inputs([e[1] for e in enc if e[1]])
    logp = -torch.rand(b, t, generator=g) * 3
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, advantages=torch.tensor([1.0, -0.7, -1.2, 0.4]),
                old_per_token_logps=logp, ref_per_token_logps=logp + 0.3 * torch.randn(b, t, generator=g),
                num_items_in_batch=torch.tensor(float(completion_mask.sum())),
                pixel_values=mm["pixel_values"], image_grid_thw=mm["image_grid_thw"],
                num_images=[len(s) for _, s in specs],
                mm_token_type_ids=adapter.token_type_ids(full))


def _loss_and_grads(trainer, inputs):
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(inputs))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("kw", [{}, {"beta": 0.05, "loss_type": "dapo"}])
def test_trl_vl_batch_loss_and_grads_match(env, kw):
    from trl import GRPOTrainer
    from fastgrpo.integrations.trl import FastGRPOTrainer
    inputs = _batch(env[3])
    ref_loss, ref_g = _loss_and_grads(_trainer(GRPOTrainer, env, **kw), inputs)
    fast_loss, fast_g = _loss_and_grads(_trainer(FastGRPOTrainer, env, **kw), inputs)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_g.keys() == fast_g.keys() and any("visual" in n for n in ref_g)
    for n in ref_g:
        torch.testing.assert_close(fast_g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=n)
