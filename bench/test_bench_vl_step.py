"""One vision-language StepGRPO training step at Qwen2-VL's real vocabulary (151,646): the
fused loss against full logits.

Model: a tiny random Qwen2-VL (text hidden 64, 2 layers; vision depth 2) with V = 151646 and an
untied lm_head; one packed micro-batch of multimodal sequences (images of several sizes, ~400
tokens; ``FASTGRPO_BENCH_VL="SEQS,V"`` overrides).  A step: vision tower + backbone forward ->
loss -> backward -> clip -> AdamW step.

* ``fused``: the trainer's ``fastgrpo.trainer.learn.optimize`` (hidden states -> ``grpo_loss``).
* ``naive``: ``model(...).logits`` -> ``log_softmax`` -> gather -> the same objective.

Peak memory: resident-set growth of one step over a warmed-up baseline (optimizer state
allocated) in a fresh process on CPU (``python bench/test_bench_vl_step.py IMPL``), the
allocator's peak on CUDA.  ``pytest bench/test_bench_vl_step.py -s`` prints the ratio.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

from conftest import rss_peak_extra
from test_bench_train_step import STEPS, peak_bytes   # the text bench's steps and peak

RESULTS: dict[str, dict] = {}


def _shape():
    seqs, v = 8, 151646
    if os.environ.get("FASTGRPO_BENCH_VL"):
        seqs, v = map(int, os.environ["FASTGRPO_BENCH_VL"].split(","))
    return seqs, v


def _setup(device="cpu"):
    from fastgrpo.tasks.tiny_vl import build_tiny_vl, random_image
    from fastgrpo.tasks.tokenizer import encode_prompt
    from fastgrpo.trainer.config import TrainConfig
    from fastgrpo.trainer.learn import batch_logprobs
    from fastgrpo.trainer.packing import pack_bins
    from fastgrpo.trainer.sample import Sample
    from fastgrpo.vl import VisionAdapter, attach_vision

    seqs, v = _shape()
    model, tok, ip = build_tiny_vl("qwen2_vl", vocab_size=v, tie_word_embeddings=False,
                                   max_pixels=28 * 28 * 16)
    model.to(device)
    adapter = VisionAdapter(model.config, tok, ip)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(seqs):
        img = random_image(56 + 14 * (i % 4), 84 - 14 * (i % 3), seed=i)
        ids, inp = adapter.encode("<image> What is shown ?", [img], encode_prompt)
        comp = torch.randint(200, v, (32,), generator=g).tolist()
        samples.append(Sample(prompt_ids=ids, completion_ids=comp, group=0, row=i,
                              prompt_inputs=inp, advantage=1.0 if i % 2 else -1.0))
    cfg = TrainConfig(beta=0.04, lr=1e-4, bf16=False)
    out = []
    for b in (list(range(seqs)), [0]):  # the batch, and a one-sequence warm-up batch
        (mb,) = pack_bins([b], samples)
        attach_vision([mb], samples, adapter, model)
        mb = mb.to(device)
        mb.extras["ref_logp"] = batch_logprobs(model, [mb], cfg)[0]
        out.append([mb])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    return model, opt, out[0], out[1], cfg




@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_vl_train_step(benchmark, impl):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, opt, batches, _, cfg = _setup(device)
    peak = peak_bytes(impl, _setup, __file__)

    def run():
        STEPS[impl](model, opt, batches, cfg)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=2, warmup_rounds=1)
    _, v = _shape()
    tokens = batches[0].num_tokens
    info = dict(impl=impl, tokens=tokens, V=v, device=device, peak_extra_bytes=peak,
                mean_s=benchmark.stats.stats.mean)
    benchmark.extra_info.update(info)
    RESULTS[impl] = info
    print(f"\nVL {impl}: {tokens} tokens, V={v}: step {info['mean_s'] * 1e3:.1f} ms, "
          f"peak extra memory {peak / 2 ** 20:.1f} MiB")


def test_vl_ratio():
    if set(RESULTS) != {"fused", "naive"}:
        pytest.skip("needs both VL train-step benchmarks in this session")
    f, nv = RESULTS["fused"], RESULTS["naive"]
    print(f"\nVL naive / fused: peak extra memory x{nv['peak_extra_bytes'] / max(f['peak_extra_bytes'], 1):.1f}, "
          f"step time x{nv['mean_s'] / f['mean_s']:.2f}")
    assert nv["peak_extra_bytes"] > f["tokens"] * f["V"] * 4   # [N x V] fp32 logits at least
    assert f["peak_extra_bytes"] < nv["peak_extra_bytes"]


def _setup_groups(share: bool, group: int):
    """The bench's model and a batch of ``seqs // group`` prompts (one image each, sizes as in
    ``_setup``) with ``group`` sampled completions each, the G samples of a prompt holding the
    same inputs (as the rollout hands them over); ``share``: each image encoded once per row."""
    from fastgrpo.tasks.tiny_vl import build_tiny_vl, random_image
    from fastgrpo.tasks.tokenizer import encode_prompt
    from fastgrpo.trainer.config import TrainConfig
    from fastgrpo.trainer.learn import batch_logprobs
    from fastgrpo.trainer.packing import pack_bins
    from fastgrpo.trainer.sample import Sample
    from fastgrpo.vl import VisionAdapter, attach_vision

    seqs, v = _shape()
    side = int(os.environ.get("FASTGRPO_BENCH_VL_SIDE", "0"))  # square images of SIDE pixels
    model, tok, ip = build_tiny_vl("qwen2_vl", vocab_size=v, tie_word_embeddings=False,
                                   max_pixels=max(28 * 28 * 16, side * side))
    adapter = VisionAdapter(model.config, tok, ip)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(seqs // group):
        size = (side, side) if side else (56 + 14 * (i % 4), 84 - 14 * (i % 3))
        ids, inp = adapter.encode("<image> What is shown ?", [random_image(*size, seed=i)],
                                  encode_prompt)
        for k in range(group):
            comp = torch.randint(200, v, (32,), generator=g).tolist()
            samples.append(Sample(prompt_ids=ids, completion_ids=comp, group=i, row=i,
                                  prompt_inputs=inp, advantage=1.0 if k % 2 else -1.0))
    cfg = TrainConfig(beta=0.04, lr=1e-4, bf16=False)
    (mb,) = pack_bins([list(range(len(samples)))], samples)
    attach_vision([mb], samples, adapter, model, share_images=share)
    mb.extras["ref_logp"] = batch_logprobs(model, [mb], cfg)[0]
    return model, torch.optim.AdamW(model.parameters(), lr=cfg.lr), [mb], cfg


def test_vl_share_images_cpu_time():
    """Each image encoded once per row (``share_images``) against once per sample: CPU time of
    one thread of the trainer's step (``optimize``), the two alternating round by round, same
    model and samples.  ``FASTGRPO_BENCH_VL_G`` (default 4, R1-VL's G) samples per prompt,
    ``FASTGRPO_BENCH_VL_SIDE`` square images of that many pixels (default: the sizes above)."""
    group = int(os.environ.get("FASTGRPO_BENCH_VL_G", "4"))
    rounds = int(os.environ.get("FASTGRPO_BENCH_VL_ROUNDS", "3"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {name: _setup_groups(share, group) for name, share in (("once", True), ("per_sample", False))}
        for model, opt, batches, cfg in runs.values():
            STEPS["fused"](model, opt, batches, cfg)  # warm-up: AdamW state, libraries
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, (model, opt, batches, cfg) in runs.items():
                t0 = time.process_time()
                STEPS["fused"](model, opt, batches, cfg)
                times[name].append(time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
    mb = runs["once"][2][0]
    best = {k: min(v) for k, v in times.items()}
    print(f"\nVL images once / per sample (G={group}, {mb.num_sequences} sequences, "
          f"{mb.num_tokens} tokens, {int(mb.model_inputs['image_grid_thw'].prod(-1).sum())} "
          f"patches encoded once vs x{group}): step CPU time {best['once']:.3f} s vs "
          f"{best['per_sample']:.3f} s, ratio per_sample/once x{best['per_sample'] / best['once']:.2f}")
    assert runs["per_sample"][2][0].model_inputs["image_grid_thw"].shape[0] == mb.num_sequences
    assert mb.model_inputs["image_grid_thw"].shape[0] == mb.num_sequences // group


if __name__ == "__main__":  # peak-memory child: python bench/test_bench_vl_step.py IMPL
    impl = sys.argv[1]
    model, opt, batches, warm, cfg = _setup("cpu")
    STEPS[impl](model, opt, warm, cfg)
    t0 = time.perf_counter()
    peak = rss_peak_extra(lambda: STEPS[impl](model, opt, batches, cfg))
    print(json.dumps({"impl": impl, "seconds": time.perf_counter() - t0,
                      "tokens": batches[0].num_tokens}), file=sys.stderr)
    print(peak)
