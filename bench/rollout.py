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
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = bench(a.engines.split(","), 1 if a.smoke else a.rounds, torch.device(a.device), a.smoke)
    print(table(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
