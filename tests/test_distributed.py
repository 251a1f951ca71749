"""Data parallelism on CPU (gloo, 2 processes): gradients and updates equal the 1-process run."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastgrpo.trainer.distributed import groups_for_rank, loss_scale
from fastgrpo.trainer.packing import balance_microbatches, pack_bins
from fastgrpo.trainer.sample import Sample

NUM_GROUPS, G, BUDGET, VOCAB = 5, 2, 40, 48


# ----------------------------------------------------------------------------- pure functions


def _samples(prompts, comps, adv):
    return [Sample(p, c, group=i, row=i, advantage=a) for i, (p, c, a) in enumerate(zip(prompts, comps, adv))]


def _completions_of(groups):
    return [g * G + j for g in groups for j in range(G)]


def test_groups_for_rank_whole_and_complete():
    for n, w in [(5, 2), (4, 4), (3, 4), (16, 3)]:
        parts = [groups_for_rank(n, r, w) for r in range(w)]
        assert [g for p in parts for g in p] == list(range(n))     # contiguous, in rank order
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        groups_for_rank(4, 2, 2)


def test_balance_microbatches():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 60, (37,), generator=g).tolist()
    for world in (1, 2, 3, 4):
        plan = balance_microbatches(lengths, 100, world)
        assert len(plan) == world
        assert len({len(p) for p in plan}) == 1          # same number of micro-batches
        flat = [i for p in plan for b in p for i in b]
        assert sorted(flat) == list(range(len(lengths)))  # each sequence exactly once
        for p in plan:
            for b in p:
                assert sum(lengths[i] for i in b) <= 100 or len(b) == 1
        loads = [sum(lengths[i] for b in p for i in b) for p in plan]
        assert max(loads) - min(loads) <= max(lengths)   # LPT bound
    assert balance_microbatches([5], 100, 3) == [[[0]], [[]], [[]]]
    assert balance_microbatches([], 100, 2) == [[], []]
    assert loss_scale(4) == 4.0 and loss_scale(1) == 1.0
    mbs = pack_bins([[], [2, 0]], _samples([[1, 2], [3], [4, 5, 6]], [[7], [8, 9], [10]], [0.5, 1.0, -1.0]))
    assert mbs[0].num_sequences == 0 and mbs[0].num_loss_tokens == 0
    assert sorted(mbs[1].seq_index.tolist()) == [0, 2] and mbs[1].num_loss_tokens == 2


# ----------------------------------------------------------------------------- 2-process gloo


def _data():
    """The global batch: NUM_GROUPS prompts x G completions, advantages per completion."""
    g = torch.Generator().manual_seed(123)
    prompts, comps, adv = [], [], []
    for _ in range(NUM_GROUPS):
        p = torch.randint(1, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        for _ in range(G):
            prompts.append(p)
            comps.append(torch.randint(1, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),),
                                       generator=g).tolist())
            adv.append(float(torch.randn(1, generator=g)))
    return prompts, comps, adv


def _num_items(loss_type, n_seq, n_tok):
    return float(n_seq) if loss_type == "grpo" else float(n_tok)


def _step(policy_call, params, batches, loss_type, num_items, scale, sync=None):
    import contextlib

    from fastgrpo import grpo_loss
    for i, mb in enumerate(batches):
        ctx = sync(i == len(batches) - 1) if sync else contextlib.nullcontext()
        with ctx:
            hidden, weight = policy_call(mb)
            loss, _ = grpo_loss(hidden, weight, mb.targets, mb.advantages, cu_seqlens=mb.cu_seqlens,
                                loss_type=loss_type, num_items_in_batch=num_items, backend="torch",
                                epsilon_low=0.2)
            (loss * scale).backward()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _worker(rank, world, port, strategy):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fastgrpo.hf import unwrap_model
    from fastgrpo.tasks.tiny_model import build_tiny_model
    from fastgrpo.trainer import distributed as D
    from fastgrpo.trainer import policy as P

    info = D.init_distributed(device="cpu", timeout_s=60)
    assert (info.rank, info.world_size, info.backend) == (rank, world, "gloo")
    try:
        prompts, comps, adv = _data()
        # rollouts: this rank "generates" whole groups; gather them back in rank order
        mine = _completions_of(D.groups_for_rank(NUM_GROUPS, rank, world))
        gathered = D.all_gather_objects([(prompts[i], comps[i], adv[i]) for i in mine])
        rows = [r for part in gathered for r in part]
        assert rows == list(zip(prompts, comps, adv))
        lengths = [len(p) + len(c) for p, c in zip(prompts, comps)]

        for loss_type in ("grpo", "dapo"):
            base = build_tiny_model(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                                    seed=0, tie_word_embeddings=(loss_type == "grpo"))
            ref_model = copy.deepcopy(base)
            # --- reference: one process, the whole batch
            ref_batches = pack_bins(balance_microbatches(lengths, BUDGET, 1)[0], _samples(prompts, comps, adv))
            n_seq = sum(mb.num_sequences for mb in ref_batches)
            n_tok = sum(mb.num_loss_tokens for mb in ref_batches)
            ref_policy = P.PolicyHiddenStates(ref_model)
            ref_params = list(ref_model.parameters())
            ref_grads = _step(lambda mb: ref_policy(mb.input_ids, mb.position_ids), ref_params,
                              ref_batches, loss_type, _num_items(loss_type, n_seq, n_tok), 1.0)
            # --- this rank's share, length-balanced, with global normalizers
            plan = balance_microbatches(lengths, BUDGET, world)
            batches = pack_bins(plan[rank], _samples(prompts, comps, adv))
            g_seq = D.global_sum(sum(mb.num_sequences for mb in batches))
            g_tok = D.global_sum(sum(mb.num_loss_tokens for mb in batches))
            assert (g_seq, g_tok) == (n_seq, n_tok)
            policy = P.wrap_model(base, "cpu", strategy=strategy)
            inner = unwrap_model(policy)
            assert inner is base
            params = list(inner.parameters())
            grads = _step(lambda mb: policy(mb.input_ids, mb.position_ids), params, batches,
                          loss_type, _num_items(loss_type, g_seq, g_tok), D.loss_scale(world),
                          sync=lambda last: P.sync_gradients(policy, last))
            for (name, _), a, b in zip(inner.named_parameters(), grads, ref_grads):
                a = a.full_tensor() if hasattr(a, "full_tensor") else a
                assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), \
                    (loss_type, name, (a - b).abs().max().item())
            # the update is the same too (SGD: Adam's g/sqrt(g^2) amplifies 1e-9 noise on ~0 grads)
            opt = torch.optim.SGD(policy.parameters(), lr=0.5, momentum=0.9)
            ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5, momentum=0.9)
            opt.step()
            ref_opt.step()
            for (name, p), q in zip(inner.named_parameters(), ref_model.parameters()):
                p = p.full_tensor() if hasattr(p, "full_tensor") else p
                assert torch.allclose(p.detach(), q.detach(), atol=1e-6), (loss_type, name)
            # generation: ranks run different numbers of forwards, no collectives inside
            with torch.no_grad(), P.gather_for_generation(policy):
                ids = torch.tensor([[1, 2, 3]])
                for _ in range(2 + 3 * rank):
                    logits = inner(input_ids=ids, use_cache=False).logits
                    ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
                with P.gather_for_generation(ref_policy):  # single model: a no-op
                    ref_logits = ref_model(input_ids=ids, use_cache=False).logits
                assert torch.allclose(inner(input_ids=ids, use_cache=False).logits, ref_logits, atol=1e-5)
            D.barrier()
    finally:
        D.cleanup_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_gloo_equals_single_process(strategy):
    mp.spawn(_worker, args=(2, _free_port(), strategy), nprocs=2, join=True)
