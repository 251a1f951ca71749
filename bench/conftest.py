"""Shared set-up of the kernel benchmarks (``pytest bench/``).

Trustworthy on a shared machine: every implementation of a case runs in the same process,
alternating round by round (the order rotates each round), and is timed in CPU time
(``time.process_time``) of one torch thread on CPU (wall time with ``torch.cuda.synchronize``
on CUDA), so other jobs on the machine change the medians little and the ratios less.  A
measured time below the GEMM floor of the same run is noise and is flagged with a warning.

Cases: on CPU the shape 1024x256x32768 in fp32 and in bf16 (a few minutes on 2 cores); with
``--bench-full`` also 4096x512x65536 and 2048x1024x151936 (hours on 2 cores); on CUDA
8192x4096x151936 in bf16.  ``FASTGRPO_BENCH_SHAPE="N,D,V[;N,D,V]"`` and
``FASTGRPO_BENCH_DTYPES=float32,bfloat16`` override them; ``FASTGRPO_BENCH_IMPLS=a,b`` runs
only those implementations (and the floor).  Options: ``--bench-threads``
(default 1), ``--bench-rounds`` (default 3, after one warm-up round), ``--bench-no-memory``
(skip the peak-memory subprocesses), ``--bench-json PATH`` (every result as JSON).

Each result holds the case, the median time, the peak extra memory (bytes above the inputs;
CUDA: allocator peak, CPU: resident-set growth measured in a fresh process by
``bench/_peak.py``) and the FLOPs counted (6*N*D*V).  The session ends with one table per kind
(``pytest_terminal_summary``): implementation, case, median time, peak extra memory, the ratio
to the fastest peer and to the 6*N*D*V floor (three GEMMs of the shape in the case's dtype,
each in its fastest layout: ``torch.mm`` on CPU, so the bf16 floor is bf16 GEMMs with bf16
outputs).
"""

import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent

CPU_SHAPES = [(1024, 256, 32768)]
CPU_FULL_SHAPES = [(1024, 256, 32768), (4096, 512, 65536), (2048, 1024, 151936)]
CPU_DTYPES = (torch.float32, torch.bfloat16)
CUDA_SHAPES = [(8192, 4096, 151936)]
OPTIONS = {}   # this session's --bench-* options (pytest_configure)


def pytest_addoption(parser):
    group = parser.getgroup("fastgrpo kernel benchmarks")
    group.addoption("--bench-full", action="store_true",
                    help="all CPU shapes (adds 4096x512x65536 and 2048x1024x151936)")
    group.addoption("--bench-threads", type=int, default=1,
                    help="torch threads on CPU (default 1: CPU time of one thread)")
    group.addoption("--bench-rounds", type=int, default=3, help="timed rounds per case")
    group.addoption("--bench-no-memory", action="store_true",
                    help="skip the peak-memory measurements (fresh processes)")
    group.addoption("--bench-json", default=None, help="write every result to this JSON file")


def pytest_configure(config):
    OPTIONS.update(full=config.getoption("--bench-full"),
                   threads=config.getoption("--bench-threads"),
                   rounds=config.getoption("--bench-rounds"),
                   memory=not config.getoption("--bench-no-memory"),
                   json=config.getoption("--bench-json"))
    if not torch.cuda.is_available():
        torch.set_num_threads(OPTIONS["threads"])


def bench_shapes():
    """``[(N, D, V, device, dtype)]`` of this session."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if os.environ.get("FASTGRPO_BENCH_SHAPE"):
        shapes = [tuple(map(int, s.split(","))) for s in
                  os.environ["FASTGRPO_BENCH_SHAPE"].split(";") if s.strip()]
    elif device == "cuda":
        shapes = CUDA_SHAPES
    else:
        shapes = CPU_FULL_SHAPES if OPTIONS.get("full") else CPU_SHAPES
    if os.environ.get("FASTGRPO_BENCH_DTYPES"):
        dtypes = [getattr(torch, s.strip()) for s in
                  os.environ["FASTGRPO_BENCH_DTYPES"].split(",") if s.strip()]
    else:
        dtypes = (torch.bfloat16,) if device == "cuda" else CPU_DTYPES
    return [(n, d, v, device, dt) for dt in dtypes for n, d, v in shapes]


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


def timer():
    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


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


def cpu_peak_extra(kind: str, impl: str, n: int, d: int, v: int, dtype=torch.float32) -> int:
    """RSS growth of one fwd+bwd in a fresh process (ru_maxrss is a high-water mark)."""
    env = {**os.environ, **PEAK_ENV, "OMP_NUM_THREADS": str(OPTIONS.get("threads", 1))}
    out = subprocess.run([sys.executable, str(HERE / "_peak.py"), kind, impl, str(n), str(d),
                          str(v), str(dtype).removeprefix("torch.")],
                         capture_output=True, text=True, timeout=1800, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return int(out.stdout.split()[-1])


def peak_extra(kind, impl, fn, n, d, v, dtype=torch.float32):
    if not OPTIONS.get("memory", True):
        return None
    if torch.cuda.is_available():
        return cuda_peak_extra(fn)
    return cpu_peak_extra(kind, impl, n, d, v, dtype)


def measure(fns: dict, rounds: int) -> dict:
    """Median time of each callable: one warm-up call each, then ``rounds`` rounds in which
    every callable runs once, the order rotating by one place per round."""
    names = list(fns)
    times = {k: [] for k in names}
    for k in names:
        fns[k]()
        sync()
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = timer()
            fns[k]()
            sync()
            times[k].append(timer() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


RESULTS = []   # one dict per implementation and case of this session, for the closing tables


def selected(impl) -> bool:
    """``FASTGRPO_BENCH_IMPLS=a,b``: only these implementations (and the floor) run."""
    only = os.environ.get("FASTGRPO_BENCH_IMPLS")
    return impl == "floor" or not only or impl in [s.strip() for s in only.split(",")]


def run_case(kind, case, fns, peaks=None, ours=()):
    """Time ``fns`` (``floor`` among them) alternating round by round; record the results."""
    n, d, v, device, dtype = case
    med = measure(fns, OPTIONS.get("rounds", 3))
    floor = med.get("floor")
    info = dict(kind=kind, N=n, D=d, V=v, dtype=str(dtype).removeprefix("torch."),
                flops=6 * n * d * v, threads=None if device == "cuda" else torch.get_num_threads(),
                device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    for impl, m in med.items():
        below = floor is not None and impl != "floor" and m < floor
        if below:
            warnings.warn(f"{kind} {impl} {n}x{d}x{v} {info['dtype']}: {m:.3f} s is below the "
                          f"GEMM floor {floor:.3f} s measured in the same run: noise (other load "
                          f"on the machine?), rerun before trusting this case", stacklevel=2)
        RESULTS.append(dict(info, impl=impl, median=m, below_floor=below,
                            peak_extra_bytes=(peaks or {}).get(impl), ours=impl in ours))
    return med


def tables(results) -> str:
    """Markdown tables, one per kind: time, peak memory, ratios to the fastest peer and floor."""
    key = (lambda r: (r["N"], r["D"], r["V"], r["dtype"]))  # noqa: E731
    out = []
    for kind in dict.fromkeys(r["kind"] for r in results):
        rows = [r for r in results if r["kind"] == kind]
        out += [f"### {kind} fwd+bwd", "",
                "| impl | N x D x V dtype | time ms | peak extra MiB | / fastest peer | "
                "/ 6NDV floor |", "|---|---|---|---|---|---|"]
        for case in dict.fromkeys(key(r) for r in rows):
            here = [r for r in rows if key(r) == case]
            floor = next((r["median"] for r in here if r["impl"] == "floor"), None)
            peers = [r["median"] for r in here if r["impl"] != "floor" and not r["ours"]]
            best = min(peers) if peers else None
            name = f"{'x'.join(map(str, case[:3]))} {case[3]}"
            for r in sorted(here, key=lambda r: (r["impl"] == "floor", r["median"])):
                if r["impl"] == "floor":
                    out.append(f"| floor (3 GEMMs) | {name} | {r['median'] * 1e3:.1f} | - | - | "
                               f"1.00 |")
                    continue
                ratio = f"{r['median'] / best:.2f}" if best else "-"
                fl = f"{r['median'] / floor:.2f}" if floor else "-"
                if r.get("below_floor"):
                    fl += " (below floor: noise)"
                peak = r["peak_extra_bytes"]
                out.append(f"| {r['impl']} | {name} | {r['median'] * 1e3:.1f} | "
                           f"{'-' if peak is None else f'{peak / 2**20:.0f}'} | {ratio} | {fl} |")
        out.append("")
    return "\n".join(out)


def pytest_terminal_summary(terminalreporter):
    if RESULTS:
        terminalreporter.write_sep("=", "fastgrpo kernel benchmarks (medians of CPU time, "
                                        f"{OPTIONS.get('threads', 1)} thread(s))"
                                   if not torch.cuda.is_available() else
                                   "fastgrpo kernel benchmarks (medians)")
        terminalreporter.write_line(tables(RESULTS))
    if RESULTS and OPTIONS.get("json"):
        Path(OPTIONS["json"]).write_text(json.dumps(RESULTS, indent=1))


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = bench_shapes()
        metafunc.parametrize("case", cases, ids=[
            f"{n}x{d}x{v}-{str(dt).removeprefix('torch.')}" for n, d, v, _, dt in cases])
