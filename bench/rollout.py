"""Rollout throughput: generated tokens/s of the rollout engines on two cases.

    python bench/rollout.py                        # hf engine vs model.generate (the old path)
    python bench/rollout.py --engines hf,vllm      # + vLLM (where installed)
    python bench/rollout.py --smoke                # tiny sizes (tests the script)

Cases (sampling at temperature 1, G=8, 72 new tokens):

* ``default``: the default training step, 16 prompts of the built-in task on the shipped
  warm-up model (completions stop at EOS, ~40 tokens on average).
* ``long``: one 512-token prompt on a random tiny Llama of the warm-up model's size with 1024
  positions (random weights: the completions run to the 72-token limit).

Engines: ``reference`` is the previous rollout (``model.generate`` on each prompt repeated G
times), ``hf`` the shared-prefill decoder (:func:`fastgrpo.trainer.rollout.generate`), ``vllm``
the vLLM engine.  The runs of the engines alternate, ``--rounds`` times; medians are reported.

Ranks (``--ranks 1,2``): the trainer's rollout as under ``torchrun --nproc-per-node K``, each rank
its own engine (hf: its own model; vllm: its own colocated engine) on its own whole prompt
groups, for the cases ``text`` (the default step: 16 prompts x G=8 of the built-in task, warm-up
model, 72 new tokens) and ``vl`` (8 chart prompts x G=4 of ``--task charts``, its tiny Qwen2-VL
warm-up model, each prompt with its image).  Per configuration: the generated tokens of all
ranks, their CPU seconds (``time.process_time``, summed over ranks; one thread each) and the
tokens per CPU second, which a loaded machine leaves comparable (wall time is reported too)::

    python bench/rollout.py --ranks 1,2 --engines hf            # any environment
    python bench/rollout.py --ranks 1,2 --engines hf,vllm       # the vLLM environment
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastgrpo.tasks.tokenizer import encode_prompt  # noqa: E402
from fastgrpo.trainer.rollout import generate, generate_reference  # noqa: E402


def cases(device, smoke: bool = False):
    """``[(name, model, tokenizer, prompt_ids, group_size, max_new_tokens)]``."""
    from fastgrpo.tasks.arithmetic import make_splits
    from fastgrpo.tasks.tiny_model import build_tiny_model
    from fastgrpo.trainer.policy import load_model

    model, tok = load_model(None, device=device)
    rows = make_splits(0)[0]
    n, new, long_len = (2, 8, 32) if smoke else (16, 72, 512)
    out = [("default", model, tok, [encode_prompt(tok, r["prompt"]) for r in rows[:n]], 8, new)]
    long_model = build_tiny_model(tok, seed=0, max_position_embeddings=1024).to(device)
    g = torch.Generator().manual_seed(0)
    prompt = [tok.bos_token_id] + torch.randint(3, len(tok), (long_len - 1,), generator=g).tolist()
    out.append(("long", long_model, tok, [prompt], 8, new))
    return out


def make_runner(engine: str, model, tok):
    """``run(prompts, G, max_new) -> Rollout`` for one engine."""
    if engine in ("hf", "reference"):
        fn = generate if engine == "hf" else generate_reference

        def run(prompts, g, new):
            return fn(model, tok, prompts, group_size=g, max_new_tokens=new, temperature=1.0,
                      do_sample=True, batch_size=128)
        return run
    if engine == "vllm":
        from fastgrpo.trainer.engines import VLLMEngine
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; CPU only: room for a second case
        eng = VLLMEngine(model, tok, max_model_len=model.config.max_position_embeddings,
                         gpu_memory_utilization=0.3)

        def run(prompts, g, new):
            return eng.generate(prompts, group_size=g, max_new_tokens=new, temperature=1.0)
        return run
    raise ValueError(f"unknown engine {engine!r}")


def bench(engines: list[str], rounds: int, device, smoke: bool = False) -> list[dict]:
    results = []
    for name, model, tok, prompts, g, new in cases(device, smoke):
        runners = {e: make_runner(e, model, tok) for e in engines}
        for e in engines:  # warm-up
            runners[e](prompts, g, new)
        tps = {e: [] for e in engines}
        for _ in range(rounds):
            for e in engines:
                torch.manual_seed(0)
                t0 = time.perf_counter()
                ro = runners[e](prompts, g, new)
                tps[e].append(ro.generated_tokens / (time.perf_counter() - t0))
        for e in engines:
            results.append({"case": name, "engine": e, "prompts": len(prompts), "G": g,
                            "prompt_tokens": max(len(p) for p in prompts), "max_new_tokens": new,
                            "tokens_per_s": statistics.median(tps[e]),
                            "all_tokens_per_s": [round(x, 1) for x in tps[e]]})
        del runners  # a vLLM engine frees its memory before the next case builds one
        gc.collect()
    return results


# ----------------------------------------------------------------------------- ranks


def _rank_case(case: str, smoke: bool):
    """``(model, tokenizer, prompts, generate kwargs, G, max_new_tokens)`` of a ranks case."""
    from fastgrpo.tasks.arithmetic import make_splits
    from fastgrpo.trainer.policy import load_model

    if case == "text":
        model, tok = load_model(None)
        rows = make_splits(0)[0][:2 if smoke else 16]
        return model, tok, [encode_prompt(tok, r["prompt"]) for r in rows], {}, 8, 8 if smoke else 72
    if case == "vl":
        from fastgrpo.trainer.config import TrainConfig
        from fastgrpo.trainer.task import load_task
        from fastgrpo.trainer.vision import setup_vision

        task = load_task("charts")
        cfg = task.configure(TrainConfig(task="charts"))
        train, evals = task.load_data(cfg)
        model, tok = load_model(task.checkpoint)
        vision = setup_vision(cfg, model, tok, train, evals)
        prompts, kw = vision.generate_kwargs(train[:2 if smoke else 8], task.encode)
        return model, tok, prompts, kw, 4, 8 if smoke else cfg.max_new_tokens
    raise ValueError(f"unknown case {case!r}")


def rank_worker(engine: str, case: str, rounds: int, smoke: bool, out: str) -> None:
    """One rank of a ranks configuration (``torchrun`` sets the rank; alone: rank 0 of 1)."""
    from fastgrpo.trainer import distributed as D
    from fastgrpo.trainer.engines import HFEngine, VLLMEngine

    torch.set_num_threads(1)
    info = D.init_distributed(device="cpu")
    model, tok, prompts, kw, g, new = _rank_case(case, smoke)
    mine = D.groups_for_rank(len(prompts), info.rank, info.world_size)
    kw = {k: [v[i] for i in mine] if isinstance(v, list) else v for k, v in kw.items()}
    if engine == "vllm":
        if kw:  # VL on vLLM: runs once VLLMEngine.generate takes prompt_inputs / vision
            import inspect
            if "vision" not in inspect.signature(VLLMEngine.generate).parameters:
                if info.is_main:
                    Path(out).write_text(json.dumps({"skipped": "VLLMEngine takes no VL prompts yet"}))
                D.cleanup_distributed()
                return
        eng = VLLMEngine(model, tok, seed=info.rank, world_size=info.world_size)
    else:
        eng = HFEngine(model, tok)
    run = lambda: eng.generate([prompts[i] for i in mine], group_size=g, max_new_tokens=new,  # noqa: E731
                               temperature=1.0, **kw)
    run()  # warm-up
    rows = []
    for k in range(rounds):
        torch.manual_seed(1000 * k + info.rank)
        D.barrier()
        c0, w0 = time.process_time(), time.perf_counter()
        ro = run()
        rows.append((ro.generated_tokens, time.process_time() - c0, time.perf_counter() - w0))
    every = D.all_gather_objects(rows)
    if info.is_main:
        per_round = [(sum(r[k][0] for r in every), sum(r[k][1] for r in every), max(r[k][2] for r in every))
                     for k in range(rounds)]
        Path(out).write_text(json.dumps({
            "tokens": statistics.median(x[0] for x in per_round),
            "cpu_s": statistics.median(x[1] for x in per_round),
            "wall_s": statistics.median(x[2] for x in per_round),
            "tokens_per_cpu_s": statistics.median(x[0] / x[1] for x in per_round),
            "tokens_per_wall_s": statistics.median(x[0] / x[2] for x in per_round)}))
    if hasattr(eng, "close"):
        eng.close()
    D.cleanup_distributed(synchronize=True)


def bench_ranks(engines: list[str], ranks: list[int], cases: list[str], rounds: int,
                smoke: bool) -> list[dict]:
    """Each (case, engine, ranks) in a fresh process (``torch.distributed.run`` for ranks > 1)."""
    import socket
    import subprocess
    import tempfile

    results = []
    for case in cases:
        for engine in engines:
            for k in ranks:
                with tempfile.TemporaryDirectory() as d:
                    out = Path(d) / "r.json"
                    with socket.socket() as sk:
                        sk.bind(("127.0.0.1", 0))
                        port = sk.getsockname()[1]
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(k),
                           "--master-addr", "127.0.0.1", "--master-port", str(port)]
                    cmd += [__file__, "--worker", engine, case, str(rounds), str(int(smoke)), str(out)]
                    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1",
                               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
                    load = os.getloadavg()[0]
                    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if r.returncode != 0:
                        raise RuntimeError(f"{case}/{engine}/{k} ranks failed:\n{r.stderr[-3000:]}")
                    res = json.loads(out.read_text())
                results.append({"case": case, "engine": engine, "ranks": k, "load": round(load, 1), **res})
                print(results[-1], flush=True)
    return results


def ranks_table(results: list[dict]) -> str:
    lines = ["| case | engine | ranks | tokens | CPU s | tokens / CPU s | wall s | load |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['case']} | {r['engine']} | {r['ranks']} | {r['skipped']} ||||| ")
            continue
        lines.append(f"| {r['case']} | {r['engine']} | {r['ranks']} | {r['tokens']:.0f} | "
                     f"{r['cpu_s']:.1f} | {r['tokens_per_cpu_s']:.0f} | {r['wall_s']:.1f} | {r['load']} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    lines = ["| case | engine | prompts x G | prompt tokens | tokens/s (median) | vs reference |",
             "|---|---|---|---|---|---|"]
    ref = {r["case"]: r["tokens_per_s"] for r in results if r["engine"] == "reference"}
    for r in results:
        ratio = f"{r['tokens_per_s'] / ref[r['case']]:.2f}x" if r["case"] in ref else "-"
        lines.append(f"| {r['case']} | {r['engine']} | {r['prompts']} x {r['G']} | "
                     f"{r['prompt_tokens']} | {r['tokens_per_s']:.0f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="reference,hf")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default="")
    ap.add_argument("--ranks", default="", help="e.g. 1,2: the per-rank rollout under torchrun")
    ap.add_argument("--cases", default="text,vl", help="--ranks: text, vl")
    a = ap.parse_args(argv)
    if a.ranks:
        res = bench_ranks(a.engines.split(","), [int(x) for x in a.ranks.split(",")],
                          a.cases.split(","), 1 if a.smoke else a.rounds, a.smoke)
        print(ranks_table(res))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
        return res
    if a.threads:
        torch.set_num_threads(a.threads)
    res = bench(a.engines.split(","), 1 if a.smoke else a.rounds, torch.device(a.device), a.smoke)
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:  # one rank of bench_ranks
        e, c, n, sm, o = sys.argv[2:7]
        rank_worker(e, c, int(n), bool(int(sm)), o)
    else:
        main()
