"""An FSDP2-sharded lm_head (a DTensor parameter) in the fused op (gloo, 2 processes): a tiny
causal LM wrapped with ``fully_shard``, the weight read outside the model's forward (as TRL's
adapter reads it), each rank half the batch; the loss and every parameter's gradient equal the
1-process run on the whole batch."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from fastgrpo import fused_logprobs, grpo_loss
from fastgrpo.ops.sharded import cast_weight
from gloo_helpers import spawn_gloo

VOCAB, B, T = 96, 4, 10


def _model(tied):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, attn_implementation="eager")
    return Qwen2ForCausalLM(cfg).float()


def _batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, -3:] = 0                                  # right padding
    mask = torch.zeros(B, T - 1)
    mask[:, 3:] = 1                                   # completion positions
    mask = mask * attn[:, 1:]
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T - 1, generator=g) * 0.05
    return ids, attn, mask, adv, old


def _loss(model, ids, attn, mask, adv, old, weight_of):
    """grpo_loss (two-pass, sequence-level ratio: per-rank mean over its sequences) plus
    fused_logprobs terms (entropy and log-probs summed per sequence, averaged over sequences;
    once through a float64 cast of the weight)."""
    from fastgrpo.integrations.trl import _install_backbone_forward
    _install_backbone_forward(getattr(model, "module", model))   # a DeepSpeed engine's module
    hidden = model(input_ids=ids, attention_mask=attn, fastgrpo_backbone=True).last_hidden_state
    hidden = hidden[:, :-1]
    weight = weight_of(model)
    targets = ids[:, 1:]
    loss, _ = grpo_loss(hidden, weight, targets, adv, completion_mask=mask, old_logp=old,
                        beta=0.0, loss_type="grpo", temperature=0.9)
    loss_tl, _ = grpo_loss(hidden, weight, targets, adv, completion_mask=mask, old_logp=old,
                           importance_sampling_level="sequence", loss_type="grpo")
    logp, ent = fused_logprobs(hidden, weight, torch.where(mask.bool(), targets, -100),
                               return_entropy=True)
    # a cast weight (TRL's cast_lm_head_to_fp32 / autocast path): float64 here
    logp64 = fused_logprobs(hidden.double(), cast_weight(weight, torch.float64), targets,
                            temperature=1.3)
    extra = ent.sum() + logp.sum() + logp64.float().sum()
    return loss + loss_tl + 0.01 * extra / ids.shape[0], weight


def _reference(tied):
    """The 1-process run on the whole batch: the batch, the loss, every parameter's gradient."""
    from fastgrpo.hf import lm_head_weight
    batch = _batch()
    ref = _model(tied)
    loss, _ = _loss(ref, *batch, lm_head_weight)
    loss.backward()
    return batch, loss.detach(), {n: p.grad for n, p in ref.named_parameters()}


def assert_equals_one_process(loss, grads, ref_loss, ref_grads, world):
    """This rank's loss averaged over the ranks, and the whole gradients, equal the 1-process
    run's (each rank's loss is the mean over its share of the batch)."""
    total = loss.detach().clone()
    dist.all_reduce(total)
    torch.testing.assert_close(total / world, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        scale = float(ref_grads[n].abs().max())
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-4, atol=1e-5 * scale + 1e-9,
                                   msg=lambda m, n=n: f"{n}: {m}")

def _check(rank, world, tied):
    from torch.distributed.fsdp import fully_shard
    from fastgrpo.hf import lm_head_weight
    (ids, attn, mask, adv, old), ref_loss, ref_grads = _reference(tied)

    model = _model(tied)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=True)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    seen = []

    def weight_of(m):
        w = lm_head_weight(m)
        seen.append(type(w).__name__)
        return w

    loss, w = _loss(model, ids[rows], attn[rows], mask[rows], adv[rows], old[rows], weight_of)
    assert seen == ["DTensor"], seen          # the sharded parameter itself reached the op
    loss.backward()
    for n, p in model.named_parameters():
        assert type(p.grad).__name__ == "DTensor" and p.grad.placements == p.placements, n
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    assert ("lm_head.weight" in grads) != tied
    assert_equals_one_process(loss, grads, ref_loss, ref_grads, world)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fsdp2_sharded_lm_head_equals_one_process(tied):
    spawn_gloo(_check, 2, tied)


def _need_deepspeed():
    """DeepSpeed installs in CI's peers environment (it runs ZeRO-3 on CPU with gloo): there the
    tests must run, elsewhere they skip."""
    if os.environ.get("FASTGRPO_REQUIRE_PEERS") != "1":
        pytest.importorskip("deepspeed")


def zero3_engine(model):
    """``model`` inside a DeepSpeed ZeRO-3 engine on CPU: every parameter partitioned (no
    persistence threshold), plain SGD, fp32."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    import deepspeed
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                 "stage3_model_persistence_threshold": 0},
           "zero_allow_untested_optimizer": True,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    engine, *_ = deepspeed.initialize(model=model, config=cfg,
                                      model_parameters=model.parameters())
    return engine


def zero3_full_grads(engine) -> dict:
    """Every parameter's whole gradient after ``engine.backward`` (a collective: all ranks)."""
    from deepspeed.utils import safe_get_full_grad
    return {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}


def _check_zero3(rank, world, tied):
    from fastgrpo.hf import lm_head_weight
    from fastgrpo.ops.sharded import is_partitioned
    (ids, attn, mask, adv, old), ref_loss, ref_grads = _reference(tied)

    engine = zero3_engine(_model(tied))
    rows = slice(rank * B // world, (rank + 1) * B // world)
    seen = []

    def weight_of(m):
        w = lm_head_weight(m)
        seen.append((is_partitioned(w), w.numel(), tuple(w.ds_shape)))
        return w

    loss, w = _loss(engine, ids[rows], attn[rows], mask[rows], adv[rows], old[rows], weight_of)
    assert seen == [(True, 0, (VOCAB, 32))], seen   # the partitioned parameter (no data here)
    engine.backward(loss)
    assert is_partitioned(w) and w.numel() == 0          # partitioned again after the backward
    grads = zero3_full_grads(engine)
    assert ("lm_head.weight" in grads) != tied
    assert_equals_one_process(loss, grads, ref_loss, ref_grads, world)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_deepspeed_zero3_partitioned_lm_head_equals_one_process(tied):
    """A DeepSpeed ZeRO-3 engine (CPU, gloo, 2 processes), the lm_head weight read outside the
    model's forward (partitioned: an empty tensor), each rank half the batch: the op gathers it
    for its forward and its backward, and the loss and every parameter's gradient (ZeRO-3's own
    reduce-scattered partitions, gathered back) equal the 1-process run on the whole batch."""
    _need_deepspeed()
    spawn_gloo(_check_zero3, 2, tied)
