"""Every Triton kernel configuration compiles for sm_80 and sm_90, on a machine without a GPU.

For each configuration listed in the kernels' ``CONFIGS`` and each operand dtype, the kernel is
compiled with ``triton.compile`` (PTX -> cubin through the ptxas shipped with triton) and its
resource use is read: shared memory from the compiled metadata, registers / stack (spills)
from ``cuobjdump -res-usage`` on the cubin.  A compile error, or shared memory above the chip's
per-block limit, fails the test; the table is printed at the end of the module.

The compilation runs in subprocesses (one per target, in parallel) with ``TRITON_INTERPRET``
removed from their environment: in a process where the Triton interpreter has run a kernel,
``triton.language`` is patched for interpretation and code generation breaks, and
tests/test_kernels_triton.py interprets kernels in the same pytest process.  Inside the
worker each kernel is re-wrapped from its python function (``kernel.fn``) in a fresh
``JITFunction``.  Run ``python tests/test_kernels_compile.py --worker 90`` to see one target's
raw results as JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")

try:
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
    from triton.runtime.jit import JITFunction  # noqa: F401
    import triton.backends.nvidia  # noqa: F401
except ImportError as exc:  # pragma: no cover - very old / non-NVIDIA triton builds
    pytest.skip(f"triton without the NVIDIA backend: {exc}", allow_module_level=True)

from fastgrpo_kernels import advantages, linear_logprobs  # noqa: E402

pytestmark = pytest.mark.slow

SMEM_LIMIT = {80: 166912, 90: 232448}  # per-block opt-in maximum: 163 KiB, 227 KiB
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_CUOBJDUMP = os.path.join(_BIN, "cuobjdump")
_TORCH_TO_TRITON = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _signature(name: str, dt: str):
    """(signature, names of the runtime args a real launch would mark 16-divisible)."""
    p = _TORCH_TO_TRITON[dt]
    name = name.removesuffix("_fp32")
    if name == "forward":
        sig = {"h_ptr": p, "w_ptr": p, "y_ptr": "*i64", "m_ptr": "*fp32", "s_ptr": "*fp32",
               "t_ptr": "*fp32", "zy_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32",
               "stride_hn": "i32", "stride_wv": "i32", "inv_t": "fp32", "v_per_split": "i32",
               "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_D": "constexpr",
               "EVEN_D": "constexpr", "UPCAST": "constexpr"}
        div = ("D", "stride_hn", "stride_wv", "v_per_split")
    elif name == "grad_logits":
        sig = {"h_ptr": p, "w_ptr": p, "y_ptr": "*i64", "lse_ptr": "*fp32", "ent_ptr": "*fp32",
               "gl_ptr": "*fp32", "ge_ptr": "*fp32", "dz_ptr": p, "R": "i32", "C": "i32",
               "D": "i32", "c0": "i32", "stride_hn": "i32", "stride_wv": "i32",
               "stride_dz": "i32", "inv_t": "fp32",
               "BLOCK_N": "constexpr", "BLOCK_V": "constexpr", "BLOCK_D": "constexpr",
               "EVEN_D": "constexpr", "UPCAST": "constexpr"}
        div = ("D", "stride_hn", "stride_wv", "stride_dz")
    else:  # group_zscore
        sig = {"r_ptr": "*fp32", "out_ptr": "*fp32", "S": "i32", "stride_g": "i32",
               "eps": "fp32", "BLOCK": "constexpr", "SCALE": "constexpr"}
        div = ()
    # a real launch marks 16-aligned pointers and 16-divisible ints (D=4096, strides) with
    # tt.divisibility; without it loads cannot be vectorised and are not pipelined
    names = list(sig)
    attrs = {(names.index(k),): [["tt.divisibility", 16]]
             for k in names if sig[k].startswith("*") or k in div}
    return sig, attrs


def _constexprs(name: str, cfg: dict) -> dict:
    if name == "group_zscore":
        return {"BLOCK": cfg["BLOCK"], "SCALE": True}
    return {"BLOCK_N": cfg["BLOCK_N"], "BLOCK_V": cfg["BLOCK_V"], "BLOCK_D": cfg["BLOCK_D"],
            "EVEN_D": True, "UPCAST": False}


def _case_keys():
    """(kernel config list name, config index, dtype, compute capability) of every case."""
    keys = []
    for module in (linear_logprobs, advantages):
        for name, configs in module.CONFIGS.items():
            for i, cfg in enumerate(configs):
                dts = ["fp32"] if name == "group_zscore" or name.endswith("_fp32") \
                    else ["bf16", "fp16"]
                for dt in dts:
                    for cc in (80, 90):
                        keys.append((name, i, dt, cc))
    return keys


def _config(name: str, i: int) -> dict:
    module = advantages if name in advantages.CONFIGS else linear_logprobs
    return module.CONFIGS[name][i]


def _case_id(key) -> str:
    name, i, dt, cc = key
    tag = "-".join(f"{k}{v}" for k, v in _config(name, i).items())
    return f"{name}-{dt}-sm{cc}-{tag}"


def _compile_one(name: str, i: int, dt: str, cc: int) -> dict:
    """Worker side: compile one case, return its resource use (or the error)."""
    from triton.backends.compiler import GPUTarget  # noqa: F401
    from triton.compiler import ASTSource  # noqa: F401
    from triton.runtime.jit import JITFunction  # noqa: F401

    module = advantages if name in advantages.CONFIGS else linear_logprobs
    cfg = module.CONFIGS[name][i]
    fn = JITFunction(module.KERNELS[name].fn)
    sig, attrs = _signature(name, dt)
    try:
        compiled = triton.compile(ASTSource(fn, sig, _constexprs(name, cfg), attrs),
                                  target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": cfg["num_warps"],
                                           "num_stages": cfg["num_stages"]})
    except Exception as exc:  # reported by the test
        return {"error": f"{type(exc).__name__}: {exc}"}
    ttgir = compiled.asm["ttgir"]
    pipelined = bool(re.search(r"async_copy_global_to_local|async_tma_copy|tma_load", ttgir))
    return dict(shared=int(compiled.metadata.shared), pipelined=pipelined,
                **_res_usage(compiled.asm["cubin"]))


def _worker(cc: int) -> None:
    out = {_case_id(k): _compile_one(*k) for k in _case_keys() if k[3] == cc}
    sys.stdout.write("\n@@RESULTS@@" + json.dumps(out) + "\n")


def _res_usage(cubin: bytes) -> dict:
    if not os.path.exists(_CUOBJDUMP):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([_CUOBJDUMP, "-res-usage", path], capture_output=True, text=True,
                             timeout=60).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        return {}
    return dict(zip(("regs", "stack", "static_shared", "local"), map(int, m.groups())))


@pytest.fixture(scope="module")
def compiled(request):
    """Compile every case in two worker subprocesses (sm_80, sm_90) running in parallel."""
    if not os.path.exists(os.path.join(_BIN, "ptxas")) and shutil.which("ptxas") is None:
        pytest.skip("no ptxas available")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {cc: subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(cc)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env)
             for cc in (80, 90)}
    results = {}
    for cc, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0 or "@@RESULTS@@" not in out:
            pytest.fail(f"compile worker for sm_{cc} failed (rc {proc.returncode}):\n"
                        f"{err[-4000:]}")
        results.update(json.loads(out.split("@@RESULTS@@", 1)[1]))
    yield results
    _report(request, results)


def _report(request, results):
    lines = ["", "Triton kernel resource use (shared = dynamic shared memory in bytes; "
             "stack/local > 0 means register spills)",
             f"{'kernel':<18}{'dtype':<6}{'sm':<4}{'BN':>5}{'BV':>5}{'BD':>5}{'warps':>6}"
             f"{'stages':>7}{'shared':>9}{'regs':>6}{'stack':>7}{'local':>7}"]
    for key in _case_keys():
        name, i, dt, cc = key
        r, c = results.get(_case_id(key), {}), _config(name, i)
        if "shared" not in r:
            lines.append(f"{name:<18}{dt:<6}{cc:<4} failed to compile")
            continue
        lines.append(f"{name:<18}{dt:<6}{cc:<4}"
                     f"{c.get('BLOCK_N', c.get('BLOCK', '')):>5}{c.get('BLOCK_V', ''):>5}"
                     f"{c.get('BLOCK_D', ''):>5}{c['num_warps']:>6}{c['num_stages']:>7}"
                     f"{r['shared']:>9}{r.get('regs', '?'):>6}{r.get('stack', '?'):>7}"
                     f"{r.get('local', '?'):>7}")
    text = "\n".join(lines)
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(text)
    else:  # pragma: no cover
        print(text)


@pytest.mark.parametrize("key", _case_keys(), ids=_case_id)
def test_compiles_within_shared_memory(key, compiled, record_property):
    name, i, dt, cc = key
    cfg = _config(name, i)
    row = compiled[_case_id(key)]
    if "error" in row:
        pytest.fail(f"{name} {cfg} {dt} sm_{cc} does not compile: {row['error']}")
    for k in ("shared", "regs", "stack", "local"):
        if k in row:
            record_property(k, row[k])
    print(row)
    assert row["shared"] <= SMEM_LIMIT[cc], (
        f"{name} {cfg} {dt}: {row['shared']} bytes of shared memory exceed sm_{cc}'s "
        f"{SMEM_LIMIT[cc]}")
    if cc == 90 and name in ("forward", "grad_logits"):
        # bf16/fp16 on sm_90 must get pipelined tensor-core loads (cp.async or TMA)
        assert row["pipelined"], f"{name} {cfg} {dt}: main loop not pipelined"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(int(sys.argv[2]))
    else:
        sys.exit("usage: python tests/test_kernels_compile.py --worker {80|90}")
