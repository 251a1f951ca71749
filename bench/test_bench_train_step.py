"""One StepGRPO training step at a large vocabulary: fused loss vs the naive full-logits path.

Model: a tiny Llama backbone (hidden 64, 2 layers) with V = 131072 (untied lm_head), one
packed micro-batch of a few hundred tokens (``FASTGRPO_BENCH_STEP="TOKENS,V,D"`` overrides).
A step is: backbone forward -> loss -> backward -> clip -> AdamW step.

* ``fused``: the trainer's own ``fastgrpo.trainer.learn.optimize`` (hidden states -> ``grpo_loss``).
* ``naive``: ``model(...).logits`` -> ``log_softmax`` -> gather -> the same objective
  (clipped ratio, k3 KL, grpo normalisation) written out in PyTorch.

Peak memory is the resident-set growth of one step over a warmed-up baseline (optimizer state
already allocated), measured in a fresh process (``python bench/test_bench_train_step.py IMPL``)
on CPU, or the allocator's peak on CUDA.  Run ``pytest bench/test_bench_train_step.py -s`` to
see the ratio printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import PEAK_ENV, rss_peak_extra

RESULTS: dict[str, dict] = {}


def _shape():
    n, v, d = 384, 131072, 64
    if os.environ.get("FASTGRPO_BENCH_STEP"):
        n, v, d = map(int, os.environ["FASTGRPO_BENCH_STEP"].split(","))
    return n, v, d


def _setup(device="cpu"):
    from fastgrpo.trainer.config import TrainConfig
    from fastgrpo.tasks.tiny_model import build_tiny_model
    from fastgrpo.trainer.packing import pack_sequences
    from fastgrpo.trainer.learn import batch_logprobs

    n, v, d = _shape()
    model = build_tiny_model(vocab_size=v, hidden_size=d, num_layers=2, num_heads=4,
                             tie_word_embeddings=False).to(device)
    g = torch.Generator().manual_seed(0)
    P, C, adv = [], [], []
    while sum(len(p) + len(c) for p, c in zip(P, C)) < n - 48:
        P.append(torch.randint(0, v, (16,), generator=g).tolist())
        C.append(torch.randint(0, v, (32,), generator=g).tolist())
        adv.append(1.0 if len(adv) % 2 else -1.0)
    cfg = TrainConfig(beta=0.04, lr=1e-4, bf16=False)
    batches = []
    for p, c, a in ((P, C, adv), (P[:1], C[:1], adv[:1])):  # the batch, and a tiny warm-up one
        (mb,) = pack_sequences(p, c, a, max_tokens=10 ** 9)
        mb = mb.to(device)
        # fixed reference log-probs so both paths compute the KL term (fused, forward only:
        # nothing [N x V] is allocated before the peak-memory baseline)
        mb.extras["ref_logp"] = batch_logprobs(model, [mb], cfg)[0]
        batches.append([mb])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    return model, opt, batches[0], batches[1], cfg


def _naive_logp(model, mb, cfg):
    logits = model(input_ids=mb.input_ids, position_ids=mb.position_ids, use_cache=False,
                   **mb.model_inputs).logits[0]   # model_inputs: images, for VL models
    logp_all = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)
    tgt = mb.targets.clamp(min=0)
    return logp_all.gather(1, tgt[:, None])[:, 0]


def _naive_step(model, opt, batches, cfg):
    opt.zero_grad(set_to_none=True)
    n_seq = sum(mb.num_sequences for mb in batches)
    for mb in batches:
        logp = _naive_logp(model, mb, cfg)
        mask = (mb.targets != -100).float()
        ratio = torch.exp(logp - logp.detach())
        adv = mb.advantages
        obj = torch.min(ratio * adv, ratio.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_low) * adv)
        d = mb.extras["ref_logp"] - logp
        per_tok = -obj + cfg.beta * (torch.exp(d) - d - 1)
        seq = torch.repeat_interleave(torch.arange(mb.num_sequences, device=logp.device),
                                      (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1]).long())
        tok_sum = torch.zeros(mb.num_sequences, device=logp.device).index_add(0, seq, per_tok * mask)
        count = torch.zeros(mb.num_sequences, device=logp.device).index_add(0, seq, mask)
        loss = (tok_sum / count.clamp(min=1)).sum() / n_seq
        loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.item()


def _fused_step(model, opt, batches, cfg):
    from fastgrpo.trainer.learn import optimize
    return optimize(model, opt, batches, cfg)["loss"]


STEPS = {"fused": _fused_step, "naive": _naive_step}


def peak_bytes(impl: str, setup=None, script: str = __file__) -> int:
    """Peak extra memory of one training step of ``impl``: the allocator's peak over a
    warmed-up step on CUDA; on CPU, ``python SCRIPT IMPL`` in a fresh process prints it."""
    setup = setup or _setup
    if torch.cuda.is_available():
        model, opt, batches, warm, cfg = setup("cuda")
        STEPS[impl](model, opt, warm, cfg)  # optimizer state allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        STEPS[impl](model, opt, batches, cfg)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    out = subprocess.run([sys.executable, script, impl], capture_output=True, text=True,
                         timeout=900, env={**os.environ, **PEAK_ENV})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_train_step(benchmark, impl):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, opt, batches, _, cfg = _setup(device)
    step = STEPS[impl]
    peak = peak_bytes(impl)

    def run():
        step(model, opt, batches, cfg)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    n, v, d = _shape()
    tokens = batches[0].num_tokens
    info = dict(impl=impl, tokens=tokens, V=v, D=d, device=device, peak_extra_bytes=peak,
                mean_s=benchmark.stats.stats.mean)
    benchmark.extra_info.update(info)
    RESULTS[impl] = info
    print(f"\n{impl}: {tokens} tokens, V={v}: step {info['mean_s'] * 1e3:.1f} ms, "
          f"peak extra memory {peak / 2 ** 20:.1f} MiB")


def test_ratio():
    if set(RESULTS) != {"fused", "naive"}:
        pytest.skip("needs both train-step benchmarks in this session")
    f, nv = RESULTS["fused"], RESULTS["naive"]
    mem = nv["peak_extra_bytes"] / max(f["peak_extra_bytes"], 1)
    spd = nv["mean_s"] / f["mean_s"]
    print(f"\nnaive / fused: peak extra memory x{mem:.1f}, step time x{spd:.2f}")
    # The naive path holds [N x V] logits (and their log-softmax and gradient); fused does not.
    n_v_bytes = f["tokens"] * f["V"] * 4
    assert nv["peak_extra_bytes"] > n_v_bytes
    assert f["peak_extra_bytes"] < nv["peak_extra_bytes"]


if __name__ == "__main__":  # peak-memory child: python bench/test_bench_train_step.py IMPL
    impl = sys.argv[1]
    model, opt, batches, warm, cfg = _setup("cpu")
    STEPS[impl](model, opt, warm, cfg)  # warm-up on one short sequence: libraries, AdamW state
    t0 = time.perf_counter()
    peak = rss_peak_extra(lambda: STEPS[impl](model, opt, batches, cfg))
    dt = time.perf_counter() - t0
    print(json.dumps({"impl": impl, "seconds": dt}), file=sys.stderr)
    print(peak)
