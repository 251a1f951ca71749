"""Prints the peak resident-set growth (bytes) of one fwd+bwd:
`python bench/_peak.py KIND IMPL N D V [DTYPE]` (DTYPE: float32, the default, or bfloat16).

Run in a fresh process by the benchmarks on CPU, where torch has no allocator statistics.
After the inputs exist and one small warm-up call has loaded the kernels, the kernel's RSS
high-water mark is reset (Linux: writing 5 to /proc/self/clear_refs), so VmHWM after the
call minus VmRSS before it is the call's peak extra memory (its outputs and gradients
included).
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_inputs, rss_peak_extra  # noqa: E402
from implementations import LOGPROB_IMPLS, LOSS_IMPLS, loss_inputs  # noqa: E402

kind, impl = sys.argv[1], sys.argv[2]
n, d, v = map(int, sys.argv[3:6])
dtype = getattr(torch, sys.argv[6]) if len(sys.argv) > 6 else torch.float32
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
h, w, y = make_inputs(n, d, v, "cpu", dtype)
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
    warm = (h[:512].detach().requires_grad_(), w, y[:512], cu[:2].clamp(max=512), adv[:1],
            args[5][:512], args[6][:512])
h.grad = w.grad = None
fn(*warm)  # load libraries and kernels before the baseline
print(rss_peak_extra(lambda: fn(*args)))
