"""``--cpu-bf16``: bf16 autocast of the backbone on CPU (AMX / AVX512-bf16 CPUs run SmolLM2
about twice as fast), for ``fastgrpo.train`` and ``fastgrpo.sft``.  The hidden states, the SFT
loss and its gradients against a float64 reference (bf16 tolerance); weights stay fp32; off by
default (the fp32 results of the README's runs unchanged)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from fastgrpo.tasks.arithmetic import make_splits
from fastgrpo.tasks.data import write_jsonl
from fastgrpo.trainer.packing import pack_sequences
from fastgrpo.trainer.policy import WARMUP_DIR, load_model, policy_hidden_states
from fastgrpo.trainer.prompting import make_encoder
from fastgrpo.trainer.supervised import sft_step
from test_run_safety import FAST, cli


def _rows(tok, n=4, seed=11):
    rows = make_splits(seed=seed, n_train=n, n_eval=1)[0]
    enc = make_encoder("")
    prompts = [enc(tok, r["prompt"]) for r in rows]
    comps = [tok(r["solution"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows]
    return prompts, comps


def _reference(model, prompts, comps):
    """Completion-only token-mean cross-entropy and its gradients, full logits in float64."""
    m = copy.deepcopy(model).double()
    total, count = 0.0, 0
    for p, c in zip(prompts, comps):
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(m(ids).logits[0, :-1], -1)
        lp = logp.gather(1, ids[0, 1:, None])[:, 0][len(p) - 1:]
        total, count = total - lp.sum(), count + len(c)
    loss = total / count
    loss.backward()
    return loss.item(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


def test_cpu_bf16_hidden_states_loss_and_gradients_against_float64():
    torch.manual_seed(0)
    model, tok = load_model(WARMUP_DIR)
    model.train()
    prompts, comps = _rows(tok)
    mb = pack_sequences(prompts, comps, None, max_tokens=4096)[0]
    # the backbone's matrix products in bf16 under --cpu-bf16 (the residual stream, hence the
    # hidden states, stays fp32): the same values within bf16 rounding, but not bit-equal
    with torch.no_grad():
        h32, _ = policy_hidden_states(model, mb)
        h16, _ = policy_hidden_states(model, mb, cpu_bf16=True)
        m64, ids, cu = copy.deepcopy(model).double(), mb.input_ids.flatten(), mb.cu_seqlens.tolist()
        h64 = torch.cat([m64.model(input_ids=ids[a:b][None]).last_hidden_state[0]  # one sequence at a time
                         for a, b in zip(cu[:-1], cu[1:])])
    assert h32.dtype == h16.dtype == torch.float32
    err32 = ((h32.double() - h64).norm() / h64.norm()).item()
    err16 = ((h16.double() - h64).norm() / h64.norm()).item()
    assert err32 < 1e-5 and 1e-4 < err16 < 3e-2, (err32, err16)
    # one SFT step at lr 0: the loss and the fp32 parameters' gradients against float64
    ref_loss, ref_grad = _reference(model, prompts, comps)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = sft_step(model, model.lm_head.weight, opt, prompts, comps, 256, grad_clip=0.0, cpu_bf16=True)
    assert loss == pytest.approx(ref_loss, rel=2e-2)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for n, p in model.named_parameters():
        g, r = p.grad.double().flatten(), ref_grad[n].flatten()
        if r.norm() > 1e-6:
            assert torch.nn.functional.cosine_similarity(g, r, dim=0) > 0.98, n
            assert (g.norm() / r.norm()).item() == pytest.approx(1.0, rel=5e-2), n


def test_cpu_bf16_from_the_command_line(tmp_path, capsys):
    from fastgrpo.trainer.loop import main as train_main
    from fastgrpo.trainer.sft import main as sft_main
    rows = make_splits(seed=5, n_train=8, n_eval=2)[0]
    write_jsonl(rows, tmp_path / "d.jsonl")
    code, out, err = cli(sft_main, capsys, "--model", str(WARMUP_DIR), "--train-file", str(tmp_path / "d.jsonl"),
                         "--completion-column", "solution", "--steps", "2", "--batch-size", "4",
                         "--micro-batch-tokens", "256", "--threads", "1", "--device", "cpu", "--cpu-bf16",
                         "--eval-file", str(tmp_path / "d.jsonl"), "--eval-size", "2", "--max-new-tokens", "8",
                         "--out", str(tmp_path / "sft"))
    assert code == 0, err
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary == json.loads(out.strip().splitlines()[-1])
    assert summary["eval_rows"] == 2 and 0 < summary["cpu_seconds"] <= summary["cpu_seconds_with_eval"]
    assert json.loads((tmp_path / "sft" / "args.json").read_text())["cpu_bf16"] is True
    code, out, err = cli(train_main, capsys, *FAST, "--model", str(tmp_path / "sft"), "--cpu-bf16",
                         "--out-dir", str(tmp_path / "rl"), "--no-save")
    assert code == 0, err
    assert json.loads((tmp_path / "rl" / "args.json").read_text())["cpu_bf16"] is True
    m = [json.loads(x) for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in m if "loss" in x)
