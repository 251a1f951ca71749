"""fused_logprobs forward+backward (logp and entropy) against naive PyTorch, Liger-Kernel and
Apple's Cut Cross-Entropy, and the 6*N*D*V floor (three ``torch.mm``) of each shape.

FLOPs recorded: 6*N*D*V for every row (the floor's count; fastgrpo's two-pass log-prob path
runs 8*N*D*V, recomputing the logits in backward).  ``pytest bench/ --benchmark-json out.json``
saves everything; the session ends with the tables (bench/conftest.py).
"""
import time

import pytest
import torch

from conftest import make_inputs, peak_extra, record, sync
from implementations import FLOOR_LAYOUTS, LOGPROB_IMPLS, floor_gemms

PEER_MODULES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}


def _rounds(device):
    return 5 if device == "cuda" else 3


@pytest.mark.parametrize("impl", list(LOGPROB_IMPLS))
def test_logprobs_fwd_bwd(benchmark, shape, impl):
    n, d, v, device, dtype = shape
    if impl in PEER_MODULES:
        pytest.importorskip(PEER_MODULES[impl])
    h, w, y = make_inputs(n, d, v, device, dtype)
    fn = LOGPROB_IMPLS[impl]

    def run():
        h.grad = w.grad = None
        fn(h, w, y)
        sync()

    peak = peak_extra("logprobs", impl, run, n, d, v)
    benchmark.pedantic(run, rounds=_rounds(device), warmup_rounds=1)
    record(benchmark, kind="logprobs", impl=impl, n=n, d=d, v=v, dtype=dtype,
           flops=6 * n * d * v, peak=peak)


def test_floor_three_gemms(benchmark, shape):
    """The time floor: the three products of the shape, each in its fastest layout."""
    n, d, v, device, dtype = shape
    h, w, y = make_inputs(n, d, v, device, dtype)
    h, w = h.detach(), w.detach()
    z = (h @ w.T) / v            # stands in for dz: any dense [N, V] operand costs the same
    dw = torch.zeros_like(w)
    layouts = {}
    for product, options in FLOOR_LAYOUTS.items():
        times = {}
        for name, fn in options.items():
            fn(h, w, z, dw)      # warm
            sync()
            t0 = time.perf_counter()
            fn(h, w, z, dw)
            sync()
            times[name] = time.perf_counter() - t0
        layouts[product] = min(times, key=times.get)

    def run():
        floor_gemms(h, w, z, dw, layouts)
        sync()

    benchmark.pedantic(run, rounds=_rounds(device), warmup_rounds=1)
    benchmark.extra_info["layouts"] = layouts
    record(benchmark, kind="floor", impl="floor", n=n, d=d, v=v, dtype=dtype,
           flops=6 * n * d * v, peak=None)
