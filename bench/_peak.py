"""Prints the resident-set growth (bytes) of one fwd+bwd: `python bench/_peak.py KIND IMPL N D V`.

Run in a fresh process by the benchmarks on CPU, where torch has no allocator statistics:
ru_maxrss is the process's high-water mark, so the growth over a warmed-up baseline is the
peak extra memory of the call (inputs are allocated before the baseline is read).
"""
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_inputs  # noqa: E402
from implementations import LOGPROB_IMPLS, LOSS_IMPLS, loss_inputs  # noqa: E402

kind, impl = sys.argv[1], sys.argv[2]
n, d, v = map(int, sys.argv[3:6])
h, w, y = make_inputs(n, d, v, "cpu", torch.float32)
if kind == "logprobs":
    fn = LOGPROB_IMPLS[impl]
    args = (h, w, y)
    warm = (h[:4].detach().requires_grad_(), w, y[:4])
else:
    fn = LOSS_IMPLS[impl]
    cu, adv, noise = loss_inputs(y)
    from fastgrpo import fused_logprobs
    with torch.no_grad():
        lp = fused_logprobs(h, w, y)
    args = (h, w, y, cu, adv, lp + noise, lp - noise)
    warm = None
h.grad = w.grad = None
if warm is not None:
    fn(*warm)  # load libraries and kernels before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
fn(*args)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
