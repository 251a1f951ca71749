"""Shared set-up of the kernel benchmarks.

Shapes: on CUDA N=8192, D=4096, V=151936 in bf16; on CPU three fp32 shapes from a small
vocabulary to Qwen's (1024x256x32768, 4096x512x65536, 2048x1024x151936).  Override with
FASTGRPO_BENCH_SHAPE="N,D,V" (several: separated by ";").

Each benchmark records in ``benchmark.extra_info``: the shape, the FLOPs it counts, the
effective TFLOP/s and the peak extra memory (bytes above the inputs; CUDA: allocator peak,
CPU: resident-set growth measured in a fresh process by ``bench/_peak.py``).  The session
ends with one table per kind (``pytest_terminal_summary``): implementation, shape, median
time, peak extra memory, the ratio to the fastest peer and to the 6*N*D*V floor (three
``torch.mm`` of the same shape, measured in the same run).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


CPU_SHAPES = [(1024, 256, 32768), (4096, 512, 65536), (2048, 1024, 151936)]
CUDA_SHAPES = [(8192, 4096, 151936)]


def bench_shapes():
    """``[(N, D, V, device, dtype)]`` of this session."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if os.environ.get("FASTGRPO_BENCH_SHAPE"):
        shapes = [tuple(map(int, s.split(","))) for s in
                  os.environ["FASTGRPO_BENCH_SHAPE"].split(";") if s.strip()]
    else:
        shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    return [(n, d, v, device, dtype) for n, d, v in shapes]


def bench_shape():
    return bench_shapes()[0]


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


RESULTS = []   # one dict per benchmark of this session, for the closing tables


def record(benchmark, *, kind, impl, n, d, v, dtype, flops, peak):
    info = dict(kind=kind, impl=impl, N=n, D=d, V=v, dtype=str(dtype), flops=flops,
                peak_extra_bytes=peak,
                device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    benchmark.extra_info.update(info)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        RESULTS.append(dict(info, median=stats.stats.median))


def tables(results, ours=("fastgrpo", "fastgrpo_two_pass", "fastgrpo_one_pass")) -> str:
    """Markdown tables, one per kind: time, peak memory, ratios to the fastest peer and floor."""
    floor = {(r["N"], r["D"], r["V"]): r["median"] for r in results if r["kind"] == "floor"}
    out = []
    for kind in dict.fromkeys(r["kind"] for r in results if r["kind"] != "floor"):
        rows = [r for r in results if r["kind"] == kind]
        out += [f"### {kind} fwd+bwd", "",
                "| impl | N x D x V | time ms | peak extra MiB | / fastest peer | / 6NDV floor |",
                "|---|---|---|---|---|---|"]
        for shape in dict.fromkeys((r["N"], r["D"], r["V"]) for r in rows):
            here = [r for r in rows if (r["N"], r["D"], r["V"]) == shape]
            peers = [r["median"] for r in here if r["impl"] not in ours]
            best = min(peers) if peers else None
            for r in sorted(here, key=lambda r: r["median"]):
                ratio = f"{r['median'] / best:.2f}" if best else "-"
                fl = f"{r['median'] / floor[shape]:.2f}" if shape in floor else "-"
                peak = r["peak_extra_bytes"]
                out.append(f"| {r['impl']} | {'x'.join(map(str, shape))} {r['dtype']} | "
                           f"{r['median'] * 1e3:.1f} | "
                           f"{'-' if peak is None else f'{peak / 2**20:.0f}'} | {ratio} | {fl} |")
            if shape in floor:
                out.append(f"| floor (3 x torch.mm) | {'x'.join(map(str, shape))} | "
                           f"{floor[shape] * 1e3:.1f} | - | - | 1.00 |")
        out.append("")
    return "\n".join(out)


def pytest_terminal_summary(terminalreporter):
    if RESULTS:
        terminalreporter.write_sep("=", "fastgrpo kernel benchmarks (medians)")
        terminalreporter.write_line(tables(RESULTS))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Effective TFLOP/s from the measured mean time, in the saved JSON."""
    for b in output_json["benchmarks"]:
        info, mean = b.get("extra_info", {}), b["stats"]["mean"]
        if info.get("flops"):
            info["tflops"] = info["flops"] / mean / 1e12


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = bench_shapes()
        metafunc.parametrize("shape", shapes, ids=[f"{n}x{d}x{v}" for n, d, v, *_ in shapes])
