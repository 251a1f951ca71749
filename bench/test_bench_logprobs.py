"""fused_logprobs forward+backward (logp and entropy) against naive PyTorch and Liger-Kernel.

FLOPs counted: 8*N*D*V for fwd+bwd (logits, recomputed logits, dH, dW), 2*N*D*V for the
cuBLAS ``h @ w.T`` reference.  ``pytest bench/ --benchmark-json out.json`` saves everything.
"""
import pytest

from conftest import make_inputs, peak_extra, record, sync
from implementations import LOGPROB_IMPLS


@pytest.mark.parametrize("impl", list(LOGPROB_IMPLS))
def test_logprobs_fwd_bwd(benchmark, shape, impl):
    n, d, v, device, dtype = shape
    if impl == "liger":
        pytest.importorskip("liger_kernel")
    if impl == "cublas" and device != "cuda":
        pytest.skip("the cuBLAS ceiling is a GPU figure")
    h, w, y = make_inputs(n, d, v, device, dtype)
    fn = LOGPROB_IMPLS[impl]

    def run():
        h.grad = w.grad = None
        fn(h, w, y)
        sync()

    peak = peak_extra("logprobs", impl, run, n, d, v)
    benchmark.pedantic(run, rounds=5 if device == "cuda" else 3, warmup_rounds=1)
    record(benchmark, kind="logprobs", impl=impl, n=n, d=d, v=v, dtype=dtype,
           flops=(2 if impl == "cublas" else 8) * n * d * v, peak=peak)
