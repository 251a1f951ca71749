"""The fused GRPO objective (grpo loss type, clipping, k3 KL) forward+backward against naive
PyTorch, Liger's LigerFusedLinearGRPOLoss, Apple's Cut Cross-Entropy log-probs composed with the
same objective and, on CUDA, Liger's Triton GRPO loss fed with materialized logits; and the
6*N*D*V floor, all in one process, alternating round by round (bench/conftest.py).
``fastgrpo`` is the automatic path; the other one is forced in ``fastgrpo_one_pass`` /
``fastgrpo_two_pass``.  Same cases as the log-prob benchmark."""
import importlib.util

import torch

from conftest import make_inputs, peak_extra, run_case, selected, sync, timer
from implementations import LOSS_IMPLS, floor_fn, loss_inputs

from fastgrpo import fused_logprobs
from fastgrpo.ops.logprobs import one_pass_pays

OURS = ("fastgrpo", "fastgrpo_one_pass", "fastgrpo_two_pass")


def test_grpo_loss_fwd_bwd(case):
    n, d, v, device, dtype = case
    h, w, y = make_inputs(n, d, v, device, dtype)
    cu, adv, noise = loss_inputs(y)
    with torch.no_grad():
        lp = fused_logprobs(h, w, y)
    old, ref = lp + noise, lp - noise
    auto_one_pass = device == "cpu" and one_pass_pays(h)
    fns = {"floor": floor_fn(h, w, timer, sync)}
    for impl, fn in LOSS_IMPLS.items():
        if not selected(impl):
            continue
        if impl.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
            continue
        if impl == "cce" and importlib.util.find_spec("cut_cross_entropy") is None:
            continue
        if impl == "liger_triton_grpo" and device != "cuda":
            continue                      # Liger's Triton GRPO loss needs CUDA
        if impl == ("fastgrpo_one_pass" if auto_one_pass else "fastgrpo_two_pass"):
            continue                      # the automatic choice already

        def run(fn=fn):
            h.grad = w.grad = None
            fn(h, w, y, cu, adv, old, ref)
        fns[impl] = run
    peaks = {impl: peak_extra("loss", impl, fns[impl], n, d, v, dtype)
             for impl in fns if impl != "floor"}
    run_case("loss", case, fns, peaks, ours=OURS)
