"""The fused GRPO objective (grpo loss type, clipping, k3 KL) forward+backward against naive
PyTorch, Liger's LigerFusedLinearGRPOLoss and, on CUDA, Liger's Triton GRPO loss fed with
materialized logits.  ``fastgrpo`` is the automatic path (one pass on CPU, the Triton two-pass
kernels on CUDA); the other path is forced in ``fastgrpo_two_pass`` (CPU) /
``fastgrpo_one_pass`` (CUDA).  Same shapes as the log-prob benchmark."""
import pytest
import torch

from conftest import make_inputs, peak_extra, record, sync
from implementations import LOSS_IMPLS, loss_inputs

from fastgrpo import fused_logprobs


@pytest.mark.parametrize("impl", list(LOSS_IMPLS))
def test_grpo_loss_fwd_bwd(benchmark, shape, impl):
    n, d, v, device, dtype = shape
    if impl.startswith("liger"):
        pytest.importorskip("liger_kernel")
    if impl == "liger_triton_grpo" and device != "cuda":
        pytest.skip("Liger's Triton GRPO loss needs CUDA")
    if impl == ("fastgrpo_one_pass" if device == "cpu" else "fastgrpo_two_pass"):
        pytest.skip(f"the automatic choice on {device} already")
    h, w, y = make_inputs(n, d, v, device, dtype)
    cu, adv, noise = loss_inputs(y)
    with torch.no_grad():
        lp = fused_logprobs(h, w, y)
    old, ref = lp + noise, lp - noise
    fn = LOSS_IMPLS[impl]

    def run():
        h.grad = w.grad = None
        fn(h, w, y, cu, adv, old, ref)
        sync()

    peak = peak_extra("loss", impl, run, n, d, v)
    benchmark.pedantic(run, rounds=5 if device == "cuda" else 3, warmup_rounds=1)
    record(benchmark, kind="loss", impl=impl, n=n, d=d, v=v, dtype=dtype,
           flops=6 * n * d * v, peak=peak)
