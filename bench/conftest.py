"""Shared set-up of the kernel benchmarks.

Shapes: on CUDA the issue's shape (N=8192, D=4096, V=151936, bf16); on CPU a modest fp32 one
that still makes the naive logits large (N=1024, D=256, V=32768: 128 MiB of logits).
Override with FASTGRPO_BENCH_SHAPE="N,D,V".

Each benchmark records in ``benchmark.extra_info``: the shape, the FLOPs it counts, the
effective TFLOP/s and the peak extra memory (bytes above the inputs; CUDA: allocator peak,
CPU: resident-set growth measured in a fresh process by ``bench/_peak.py``).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def bench_shape():
    if os.environ.get("FASTGRPO_BENCH_SHAPE"):
        n, d, v = map(int, os.environ["FASTGRPO_BENCH_SHAPE"].split(","))
    elif torch.cuda.is_available():
        n, d, v = 8192, 4096, 151936
    else:
        n, d, v = 1024, 256, 32768
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return n, d, v, device, dtype


def make_inputs(n, d, v, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(device=device, dtype=dtype)
    w.requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(device)
    return h, w, y


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_peak_extra(fn):
    """Peak allocated bytes above what was allocated before fn ran (CUDA only)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# glibc keeps freed large blocks in a heap that does not shrink once its dynamic mmap threshold
# has risen; pinned at 1 MiB, large tensors are mmap'd and unmapped when freed, so the RSS of a
# child process started with this environment tracks live tensors, not allocator residue.
PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_peak_extra(fn) -> int:
    """Peak resident-set growth (bytes) while ``fn()`` runs, in this process (Linux): the
    kernel's high-water mark is reset first (``5`` into /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base


def cpu_peak_extra(kind: str, impl: str, n: int, d: int, v: int) -> int:
    """RSS growth of one fwd+bwd in a fresh process (ru_maxrss is a high-water mark)."""
    env = {**os.environ, **PEAK_ENV}
    out = subprocess.run([sys.executable, str(HERE / "_peak.py"), kind, impl, str(n), str(d),
                          str(v)], capture_output=True, text=True, timeout=900, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.split()[-1])


def peak_extra(kind, impl, fn, n, d, v):
    if torch.cuda.is_available():
        return cuda_peak_extra(fn)
    return cpu_peak_extra(kind, impl, n, d, v)


def record(benchmark, *, kind, impl, n, d, v, dtype, flops, peak):
    benchmark.extra_info.update(dict(kind=kind, impl=impl, N=n, D=d, V=v, dtype=str(dtype),
                                     flops=flops, peak_extra_bytes=peak,
                                     device=torch.cuda.get_device_name()
                                     if torch.cuda.is_available() else "cpu"))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Effective TFLOP/s from the measured mean time, in the saved JSON."""
    for b in output_json["benchmarks"]:
        info, mean = b.get("extra_info", {}), b["stats"]["mean"]
        if info.get("flops"):
            info["tflops"] = info["flops"] / mean / 1e12


@pytest.fixture(scope="session")
def shape():
    return bench_shape()
