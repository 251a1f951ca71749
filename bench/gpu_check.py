"""One-call GPU check: correctness at real shapes in bf16, then the benchmarks, then a table.

    python bench/gpu_check.py --out bench/results          # on a GPU machine
    python bench/gpu_check.py --smoke --out /tmp/r         # CPU, tiny shapes (tests the script)

1. Correctness (bf16, N=8192, D=4096, V=151936 on CUDA): ``fused_logprobs`` and ``grpo_loss``
   with the triton backend against the chunked torch backend on the full shape (logp,
   entropy, dH, dW), and against a float64 full-logits reference on a subset of rows (dH of a
   row depends on that row only, so the subset check is exact); the one-pass ``grpo_loss``
   path against the two-pass one.
2. Benchmarks: ``pytest bench/test_bench_logprobs.py bench/test_bench_loss.py`` with
   ``--bench-json``: fastgrpo (both loss paths), naive, Liger, Cut Cross-Entropy, and the
   three cuBLAS GEMMs of the shape (the 6*N*D*V floor).
3. Markdown tables (time, peak extra memory, the ratio to the fastest peer and to the three
   cuBLAS GEMMs) written to ``<out>/<device>-<date>.md`` with the JSON beside it.
4. Rollouts (``bench/rollout.py``): generated tokens/s of the previous ``model.generate`` path,
   the ``hf`` engine and, where vLLM is installed, the ``vllm`` engine (``--skip-rollout``).
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from conftest import make_inputs  # noqa: E402

from fastgrpo import fused_logprobs, grpo_loss  # noqa: E402
from fastgrpo.ops.logprobs import naive_logprobs  # noqa: E402


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def correctness(n, d, v, device, dtype, backend, subset=256):
    rows = []
    h, w, y = make_inputs(n, d, v, device, dtype, seed=1)
    g = torch.Generator(device="cpu").manual_seed(2)
    a = torch.randn(n, generator=g).to(device)
    b = torch.randn(n, generator=g).to(device)

    def run(bk, hh, ww, yy, aa, bb):
        hh = hh.detach().requires_grad_()
        ww = ww.detach().requires_grad_()
        lp, en = fused_logprobs(hh, ww, yy, return_entropy=True, backend=bk)
        (lp * aa + en * bb).sum().backward()
        return lp.detach(), en.detach(), hh.grad, ww.grad

    test = run(backend, h, w, y, a, b)
    base = run("torch", h, w, y, a, b)
    for name, x, r in zip(("logp", "entropy", "dH", "dW"), test, base):
        rows.append((f"{backend} vs torch backend, full shape", name, rel_err(x, r)))
    del base
    # float64 reference on a subset of rows (hidden gradient rows are independent)
    idx = torch.arange(min(subset, n), device=device)
    hs = h.detach()[idx].double().requires_grad_()
    rl, re_ = naive_logprobs(hs, w.detach().double(), y[idx])
    (rl * a[idx].double() + re_ * b[idx].double()).sum().backward()
    for name, x, r in (("logp", test[0][idx], rl), ("entropy", test[1][idx], re_),
                       ("dH", test[2][idx], hs.grad)):
        rows.append((f"{backend} vs float64, {len(idx)} rows", name, rel_err(x, r.detach())))
    # fused loss against fused_logprobs + the same formulas through autograd
    cu = torch.tensor([0, n // 3, n], device=device, dtype=torch.int32)
    adv = torch.tensor([1.0, -0.5], device=device)
    with torch.no_grad():
        lp0 = fused_logprobs(h, w, y, backend=backend)
    old, ref = lp0 + 0.05 * a, lp0 - 0.05 * b
    h1, w1 = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss, _ = grpo_loss(h1, w1, y, adv, cu_seqlens=cu, old_logp=old, ref_logp=ref, beta=0.04,
                        backend=backend)
    loss.backward()
    h2, w2 = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss2, _ = grpo_loss(h2, w2, y, adv, cu_seqlens=cu, old_logp=old, ref_logp=ref, beta=0.04,
                         backend="torch")
    loss2.backward()
    rows.append((f"grpo_loss {backend} vs torch", "loss", rel_err(loss, loss2)))
    rows.append((f"grpo_loss {backend} vs torch", "dH", rel_err(h1.grad, h2.grad)))
    rows.append((f"grpo_loss {backend} vs torch", "dW", rel_err(w1.grad, w2.grad)))
    del h2, w2
    h3, w3 = h.detach().requires_grad_(), w.detach().requires_grad_()
    loss3, _ = grpo_loss(h3, w3, y, adv, cu_seqlens=cu, old_logp=old, ref_logp=ref, beta=0.04,
                         backend="torch", one_pass=True)
    loss3.backward()
    rows.append((f"grpo_loss one-pass vs {backend} two-pass", "loss", rel_err(loss3, loss)))
    rows.append((f"grpo_loss one-pass vs {backend} two-pass", "dH", rel_err(h3.grad, h1.grad)))
    rows.append((f"grpo_loss one-pass vs {backend} two-pass", "dW", rel_err(w3.grad, w1.grad)))
    return rows


def summarize(bench_json) -> str:
    """The closing tables of the benchmark session (bench/conftest.py), from its JSON."""
    from conftest import tables
    return tables(json.loads(Path(bench_json).read_text()))


def rollout_table(device, smoke: bool) -> str:
    """The rollout benchmark's table: reference and hf, plus vllm where installed (its
    failure is reported in the table, not raised: the kernel results above still count)."""
    import importlib.util

    import rollout

    engines = ["reference", "hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    print(f"rollout benchmark: {', '.join(engines)}", flush=True)
    try:
        return rollout.table(rollout.bench(engines, 1 if smoke else 3, torch.device(device), smoke))
    except Exception as e:  # noqa: BLE001
        if engines[-1] != "vllm":
            raise
        return (rollout.table(rollout.bench(engines[:-1], 1 if smoke else 3, torch.device(device), smoke))
                + f"\n\nvllm engine failed: {type(e).__name__}: {e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU ok)")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-rollout", action="store_true", help="no rollout tokens/s benchmark")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if args.smoke or not cuda:
        n, d, v, dtype = 300, 64, 5000, torch.float32
        os.environ.setdefault("FASTGRPO_BENCH_SHAPE", f"{n},{d},{v}")
    else:
        n, d, v, dtype = 8192, 4096, 151936, torch.bfloat16
    name = torch.cuda.get_device_name() if cuda else "cpu"
    stamp = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{name.replace(' ', '_')}-{stamp}"
    import triton
    lines = [f"# fastgrpo GPU check: {name}, {stamp}", "",
             f"torch {torch.__version__}, triton {triton.__version__}", ""]

    backend = "triton" if cuda else "torch"
    print(f"correctness at N={n} D={d} V={v} {dtype} on {name} ({backend})", flush=True)
    corr = correctness(n, d, v, device, dtype, backend)
    lines += ["## Correctness (relative L2 error)", "", "| check | quantity | rel. error |",
              "|---|---|---|"]
    lines += [f"| {c} | {q} | {e:.2e} |" for c, q, e in corr]

    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")   # kept if a later part fails
    if not args.skip_bench:
        bench_json = out / f"{tag}.json"
        cmd = [sys.executable, "-m", "pytest", str(HERE / "test_bench_logprobs.py"),
               str(HERE / "test_bench_loss.py"), "-q", "-p", "no:cacheprovider",
               f"--bench-json={bench_json}"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=False)
        if bench_json.exists():
            lines += ["", "## fwd+bwd benchmarks (medians; '/ 6NDV floor' = over the three "
                      "cuBLAS GEMMs of the shape)", "", summarize(bench_json)]
        (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    if not args.skip_rollout:
        try:
            table = rollout_table(device, args.smoke)
        except Exception as e:  # noqa: BLE001  (the kernel results above still count)
            table = f"rollout benchmark failed: {type(e).__name__}: {e}"
        lines += ["", "## Rollouts (tokens/s, G=8, bench/rollout.py)", "", table]
    text = "\n".join(lines) + "\n"
    (out / f"{tag}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
