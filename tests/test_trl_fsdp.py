"""FastGRPOTrainer (TRL) on an FSDP2-sharded model, 2 gloo processes: the loss and every
parameter's gradient equal the 1-process trainer's on the same batch.

Two wrappings.  ``accelerate``: accelerate 1.16 sets its FSDP distributed type only for
accelerator devices (a CPU run with an FSDP plugin silently gets DDP), so the model is wrapped
by accelerate's own ``fsdp2_prepare_model`` with the plugin built from the trainer's
``fsdp_config`` (what ``Accelerator.prepare`` calls for FSDP2 on a GPU).  It puts the lm_head in
a group with the final norm that stays unsharded after the forward, so the fused loss receives a
plain (gathered) weight and FSDP reduce-scatters its gradient.  ``fully_shard``: plain
``fully_shard`` per decoder layer and on the root with ``reshard_after_forward=True``; the loss
receives the sharded DTensor and gathers it itself (``fastgrpo.ops.sharded``).  Everything else
is the trainer's own code.

DeepSpeed ZeRO-3 (where it installs: CI's peers environment): the trainer's model inside a
ZeRO-3 engine (``deepspeed.initialize``, CPU, gloo; accelerate's DeepSpeed mode needs an
accelerator device, as its FSDP mode does), ``compute_loss`` called with the engine as TRL's
training step does and ``engine.backward``; the loss receives the partitioned (empty) lm_head
weight and gathers it, and the gradients ZeRO-3 reduce-scattered into its partitions, gathered
back, equal the 1-process trainer's.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from gloo_helpers import free_port
from test_integrations import _batch, _tiny_llama, _tiny_tokenizer, _trainer

FSDP = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})


def _env(d):
    from datasets import Dataset
    ds = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6", "w7 w8 w9 w10"] * 2})
    return d, _tiny_tokenizer(), ds


def _share(inputs, rank, world):
    """This rank's rows of a TRL batch (contiguous, as accelerate's sampler splits it)."""
    b = inputs["prompt_ids"].shape[0]
    rows = slice(rank * b // world, (rank + 1) * b // world)
    return {k: (v[rows] if v.dim() and v.shape[0] == b else v) for k, v in inputs.items()}


def _loss_and_grads(trainer, model, inputs):
    trainer.current_gradient_accumulation_steps = 2
    model.train()
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach()
             for n, p in model.named_parameters()}
    return loss.detach(), grads


def _worker(rank, world, port, d, loss_type, wrap, ref_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from test_sharded_lm_head import assert_equals_one_process
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    import fastgrpo.integrations.trl as adapter
    tr = _trainer(adapter.FastGRPOTrainer, _env(d), loss_type=loss_type, **FSDP)
    assert tr.accelerator.num_processes == world
    if wrap == "accelerate":
        plugin = FullyShardedDataParallelPlugin(**tr.args.fsdp_plugin_args)
        tr.accelerator.state.fsdp_plugin = plugin
        model = fsdp2_prepare_model(tr.accelerator, tr.model)
    else:
        from torch.distributed.fsdp import fully_shard
        model = tr.model
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model, reshard_after_forward=True)
    assert type(model.lm_head.weight).__name__ == "DTensor"
    assert type(model.model.layers[0]).__name__.startswith("FSDP")
    seen, head = [], adapter.lm_head_weight
    adapter.lm_head_weight = lambda m: seen.append(type(w := head(m)).__name__) or w
    mine = _share(_batch(), rank, world)
    loss, grads = _loss_and_grads(tr, model, mine)
    assert seen == (["DTensor"] if wrap == "fully_shard" else ["Parameter"]), seen
    assert_equals_one_process(loss, grads, *torch.load(ref_path), world)
    dist.destroy_process_group()


def _zero3_worker(rank, world, port, d, kw, ref_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from test_sharded_lm_head import assert_equals_one_process, zero3_engine, zero3_full_grads

    import fastgrpo.integrations.trl as adapter
    from fastgrpo.ops.sharded import is_partitioned
    tr = _trainer(adapter.FastGRPOTrainer, _env(d), **kw)
    assert tr.accelerator.num_processes == world
    engine = zero3_engine(tr.model)
    seen, head = [], adapter.lm_head_weight
    adapter.lm_head_weight = lambda m: seen.append(is_partitioned(w := head(m))) or w
    mine = _share(_batch(), rank, world)
    tr.current_gradient_accumulation_steps = 2
    engine.train()
    loss = tr.compute_loss(engine, mine)
    engine.backward(loss)
    assert seen == [True], seen                  # the op received the partitioned weight
    grads = zero3_full_grads(engine)
    assert_equals_one_process(loss, grads, *torch.load(ref_path), world)
    dist.destroy_process_group()


@pytest.mark.parametrize("wrap,loss_type", [("accelerate", "grpo"), ("fully_shard", "dapo")])
def test_trl_fsdp2_equals_one_process(tmp_path, wrap, loss_type):
    pytest.importorskip("trl")
    from fastgrpo.integrations.trl import FastGRPOTrainer
    d = tmp_path / "tiny"
    _tiny_llama().save_pretrained(d)
    _tiny_tokenizer().save_pretrained(d)
    tr = _trainer(FastGRPOTrainer, _env(d), loss_type=loss_type)     # 1 process, whole batch
    ref = _loss_and_grads(tr, tr.model, _batch())
    assert float(ref[0]) != 0 and all(float(g.abs().max()) > 0 for g in ref[1].values())
    torch.save(ref, tmp_path / "ref.pt")
    mp.spawn(_worker, args=(2, free_port(), d, loss_type, wrap, str(tmp_path / "ref.pt")),
             nprocs=2, join=True)


def test_trl_deepspeed_zero3_equals_one_process(tmp_path):
    pytest.importorskip("trl")
    if os.environ.get("FASTGRPO_REQUIRE_PEERS") != "1":   # CI's peers leg: must run
        pytest.importorskip("deepspeed")
    from fastgrpo.integrations.trl import FastGRPOTrainer
    d = tmp_path / "tiny"
    _tiny_llama().save_pretrained(d)
    _tiny_tokenizer().save_pretrained(d)
    kw = dict(loss_type="grpo", beta=0.04)
    tr = _trainer(FastGRPOTrainer, _env(d), **kw)                  # 1 process, whole batch
    ref = _loss_and_grads(tr, tr.model, _batch())
    assert float(ref[0]) != 0 and all(float(g.abs().max()) > 0 for g in ref[1].values())
    torch.save(ref, tmp_path / "ref.pt")
    mp.spawn(_zero3_worker, args=(2, free_port(), d, kw, str(tmp_path / "ref.pt")),
             nprocs=2, join=True)
