"""Packed rows against batched rows through a real backbone, forward + backward (CPU time).

    OMP_NUM_THREADS=1 python bench/packed_attention.py [--seqs 16] [--len 175] [--rounds 2]
        [--modes batched,sdpa_varlen,sdpa] [--vary]

The same sequences go through SmolLM2-135M-Instruct's backbone (``load_smollm2``'s cached HF
directory) either as one plain batch ``[S, L]`` (sdpa, no padding when lengths are equal)
or as one packed row ``[1, S*L]`` (position ids restarting per sequence) under an attention
backend: ``sdpa_varlen`` (split at cu_seqlens) or ``sdpa`` (transformers' dense
block-diagonal mask).  Modes alternate round by round; prints the median CPU time
(``time.process_time``, one thread) of each and its ratio to ``batched``.  ``--vary``: lengths
drawn from [len/2, len] (the batch pads to the longest).
"""

import argparse
import statistics
import time

import torch


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--len", type=int, default=175)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--modes", default="batched,sdpa_varlen,sdpa")
    ap.add_argument("--vary", action="store_true")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from fastgrpo.hf import backbone_hidden_states
    from fastgrpo.trainer.attention import apply_attention, select_attention
    from fastgrpo.trainer.presets import smollm2_hf_dir

    dtype = getattr(torch, a.dtype)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_dir(), dtype=dtype, attn_implementation="sdpa")
    model.train()
    g = torch.Generator().manual_seed(0)
    lens = ([int(x) for x in torch.randint(a.len // 2, a.len + 1, (a.seqs,), generator=g)]
            if a.vary else [a.len] * a.seqs)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in lens]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    packed_ids = torch.cat(seqs)[None]
    packed_pos = torch.cat([torch.arange(n) for n in lens])[None]
    width = max(lens)
    batch_ids = torch.zeros(a.seqs, width, dtype=torch.long)
    batch_att = torch.zeros(a.seqs, width, dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: real tokens first
        batch_ids[i, :len(s)] = s
        batch_att[i, :len(s)] = 1

    def run(mode):
        model.zero_grad(set_to_none=True)
        t = time.process_time()
        if mode == "batched":
            apply_attention(model, "sdpa")
            h = backbone_hidden_states(model, batch_ids,
                                       attention_mask=None if not a.vary else batch_att)
            loss = (h.float() * batch_att[..., None]).pow(2).mean()
        else:
            apply_attention(model, select_attention(mode, "cpu"))
            h = backbone_hidden_states(model, packed_ids, position_ids=packed_pos, cu_seqlens=cu,
                                       max_seqlen=width)
            loss = h.float().pow(2).mean() * (packed_ids.numel() / batch_ids.numel())
        loss.backward()
        return time.process_time() - t

    modes = a.modes.split(",")
    times = {m: [] for m in modes}
    for r in range(a.rounds):
        for m in (modes if r % 2 == 0 else modes[::-1]):
            times[m].append(run(m))
            print(f"round {r} {m}: {times[m][-1]:.2f} s", flush=True)
    base = statistics.median(times[modes[0]])
    print(f"\n{a.seqs} sequences, lengths {min(lens)}-{max(lens)} (sum {sum(lens)}), {a.dtype}, fwd+bwd, CPU s (1 thread)")
    print("| mode | median CPU s | / " + modes[0] + " |\n|---|---|---|")
    for m in modes:
        med = statistics.median(times[m])
        print(f"| {m} | {med:.2f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
