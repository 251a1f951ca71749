"""fused_logprobs forward+backward (logp and entropy) against naive PyTorch, Liger-Kernel and
Apple's Cut Cross-Entropy, and the 6*N*D*V floor (three GEMMs) of each case, all in one
process, alternating round by round (bench/conftest.py).

FLOPs recorded: 6*N*D*V for every row (the floor's count; fastgrpo's two-pass log-prob path
runs 8*N*D*V, recomputing the logits in backward).  ``pytest bench/ --bench-json out.json``
saves everything; the session ends with the tables.
"""
import importlib.util

from conftest import make_inputs, peak_extra, run_case, selected, sync, timer
from implementations import LOGPROB_IMPLS, floor_fn

PEER_MODULES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}


def available(impl):
    return impl not in PEER_MODULES or importlib.util.find_spec(PEER_MODULES[impl]) is not None


def test_logprobs_fwd_bwd(case):
    n, d, v, device, dtype = case
    h, w, y = make_inputs(n, d, v, device, dtype)
    fns = {"floor": floor_fn(h, w, timer, sync)}
    for impl, fn in LOGPROB_IMPLS.items():
        if not available(impl) or not selected(impl):
            continue

        def run(fn=fn):
            h.grad = w.grad = None
            fn(h, w, y)
        fns[impl] = run
    peaks = {impl: peak_extra("logprobs", impl, fns[impl], n, d, v, dtype)
             for impl in fns if impl != "floor"}
    run_case("logprobs", case, fns, peaks, ours=("fastgrpo", "fastgrpo_keep_logits"))
