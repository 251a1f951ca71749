"""Multi-turn retrieval rollouts (fastgrpo.trainer.multiturn): token-in/token-out, the tool-token
mask through packing and the fused loss, step rewards -> token advantages, a fake policy."""

import pytest
import torch

from fastgrpo.kb import KnowledgeBase
from fastgrpo.ops.loss import grpo_loss
from fastgrpo.tasks import routing as T
from fastgrpo.tasks.tiny_model import build_tiny_model
from fastgrpo.tasks.tokenizer import encode_prompt
from fastgrpo.trainer import multiturn as M
from fastgrpo.trainer.packing import pack_sequences

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return T.build_routing_tokenizer(0)


@pytest.fixture(scope="module")
def kb_paths(tmp_path_factory):
    return T.build_kbs(T.make_world(0), tmp_path_factory.mktemp("kbs"))


@pytest.fixture()
def tool(kb_paths):
    t = M.KBTool(kb_paths, top_k=3)
    yield t
    t.close()


@pytest.fixture(scope="module")
def rows():
    train, _ = T.online_splits(0)
    kinds = {}
    for r in train:  # one question of each kind
        kinds.setdefault(r["question_id"].rsplit("-", 1)[0], r)
    return list(kinds.values())


def _script(tok, texts):
    """A fake policy: for each context, the next of its scripted step texts (by the number
    of policy steps already in it); ``calls`` maps every context it saw to the ids it returned."""
    calls = {}

    def step(contexts):
        out = []
        for c in contexts:
            done = tok.decode(c).split("Origin question:")[-1]  # the steps written so far
            k = done.count("</ret>") + done.count("</answer>")
            ids = tok(texts[min(k, len(texts) - 1)], add_special_tokens=False)["input_ids"]
            calls[tuple(c)] = ids
            out.append((ids, [-0.5] * len(ids)))
        return out

    return step, calls


def _always_table(tok):
    """Always asks the table KB, answers what it read, then stops: 'none' and a final answer."""
    return _script(tok, [T.retrieve_completion("Which country is it?", "table"),
                         T.answer_completion("unknown"),
                         T.retrieve_completion("none", "none"),
                         T.answer_completion("unknown")])


def test_token_in_token_out(tok, tool, rows):
    step, calls = _always_table(tok)
    prompts = [encode_prompt(tok, r["prompt"]) for r in rows]
    ro = M.rollout_turns(step, tok, prompts, tool, group_size=2, max_turns=8)
    assert len(ro.samples) == 2 * len(rows)
    for s in ro.samples:
        assert [st["kind"] for st in s.steps] == ["retrieve", "answer", "retrieve", "answer"]
        assert s.steps[-1]["final"] and not s.steps[1]["final"] and not s.truncated
        assert len(s.loss_mask) == len(s.completion_ids) == len(s.sampling_logp)
        pos = 0
        for k, st in enumerate(s.steps):
            if k == 1:  # after the search: exactly the tokenizer's ids of the tool's output text
                tool_ids = tok(tool(s.steps[0]["kb"], s.steps[0]["query"]), add_special_tokens=False)["input_ids"]
                assert s.completion_ids[pos:st["start"]] == tool_ids
                assert not any(s.loss_mask[pos:st["start"]])
            else:
                assert st["start"] == pos
            # the step's context was the sample's prompt ids + its completion ids so far, and
            # its ids are exactly what the policy returned (never decoded and re-encoded)
            ctx = tuple(s.prompt_ids + s.completion_ids[:st["start"]])
            assert calls[ctx] == s.completion_ids[st["start"]:st["end"]]
            assert all(s.loss_mask[st["start"]:st["end"]])
            pos = st["end"]
        assert pos == len(s.completion_ids)
    # the decoded text is not a faithful round trip ('it' is out of the vocabulary: <unk>,
    # which decoding drops), which is why ids are never re-tokenized
    text = ro.samples[0].steps[0]["text"]
    assert tok(text, add_special_tokens=False)["input_ids"] != calls[tuple(ro.samples[0].prompt_ids)]


def test_fake_policy_always_one_kb(tok, tool, rows):
    step, _ = _always_table(tok)
    tool.calls.clear()
    ro = M.rollout_turns(step, tok, [encode_prompt(tok, r["prompt"]) for r in rows], tool, group_size=2)
    assert {kb for kb, _ in tool.calls} == {"table"} and len(tool.calls) == len(ro.samples)
    for s in ro.samples:
        assert "<result>\n[1] city:" in s.text  # the table KB's rows came back as tool tokens
    res = M.score_turns(ro.samples, rows)
    by_kind = {rows[s.row]["question_id"].rsplit("-", 1)[0]: (s, i) for i, s in enumerate(ro.samples)}
    s, i = by_kind["population"]  # teacher: table, then none -> both right
    assert res.per_function["routing_accuracy"][i] == 1.0
    assert s.steps[0]["reward"] == pytest.approx(0.5 * T_sim(s.steps[0]["query"], rows[s.row]["hops"][0]["query"]) + 0.5)
    s, i = by_kind["city-of"]  # teacher: text, then none -> 1 of 2
    assert res.per_function["routing_accuracy"][i] == 0.5
    assert s.steps[2]["reward"] == 1.0  # none / none == the teacher's stop
    s, i = by_kind["country-of"]  # teacher: text, table, none; the fake stops after one -> 0 of 3
    assert res.per_function["routing_accuracy"][i] == 0.0
    assert all(v == 0.0 for v in res.per_function["answer_recall"])  # 'unknown' is never right
    kept = M.turn_advantages(ro.samples, 2, drop_zero_std_groups=False)
    for s in kept:
        adv = torch.tensor(s.advantage)
        mask = torch.tensor(s.loss_mask)
        assert (adv[~mask] == 0).all()
    # process supervision normalises over all steps of the group: identical samples still
    # learn which of their steps were good; only a group whose step rewards are all equal is dropped
    assert len(M.turn_advantages(ro.samples, 2)) == len(ro.samples)
    step, _ = _script(tok, [T.retrieve_completion("Which country", "It")])
    flat = M.rollout_turns(step, tok, [encode_prompt(tok, rows[0]["prompt"])], tool, group_size=2, max_turns=2)
    M.score_turns(flat.samples, rows[:1])
    assert M.turn_advantages(flat.samples, 2) == []


def T_sim(a, b):
    from fastgrpo.rewards.retrieval import lexical_similarity
    return lexical_similarity(a.lower(), b)


def test_step_limit_and_unknown_kb(tok, tool, rows):
    step, _ = _script(tok, [T.retrieve_completion("Which country", "It")])  # never stops asking
    ro = M.rollout_turns(step, tok, [encode_prompt(tok, rows[0]["prompt"])], tool, max_turns=3)
    s = ro.samples[0]
    assert s.step_limit and len(s.steps) == 3 and not s.truncated
    assert "no knowledge base named" in s.text and tool.calls[-1][0] == "it"
    res = M.score_turns(ro.samples, rows[:1])
    assert all(st["reward"] == 0.0 for st in s.steps)  # unknown KB: 0
    assert res.per_function["answer_recall"] == [0.0]


def test_advantages_are_process_supervision(tok, tool, rows):
    from fastgrpo.ops.advantages import process_advantages
    good = [T.retrieve_completion(rows[0]["hops"][0]["query"], rows[0]["hops"][0]["kb"]),
            T.answer_completion(rows[0]["hops"][0]["answer"])]
    step_a, _ = _script(tok, good + [T.retrieve_completion("none", "none"), T.answer_completion(rows[0]["answer"])])
    step_b, _ = _always_table(tok)
    p = [encode_prompt(tok, rows[0]["prompt"])]
    sa = M.rollout_turns(step_a, tok, p, tool).samples + M.rollout_turns(step_b, tok, p, tool).samples
    M.score_turns(sa, rows[:1])
    kept = M.turn_advantages(sa, 2)
    assert len(kept) == 2
    S = max(len(s.steps) for s in sa)
    r = torch.full((2, S), float("nan"))
    for b, s in enumerate(sa):
        for k, st in enumerate(s.steps):
            r[b, k] = st["reward"]
    idx = torch.full((2, max(len(s.completion_ids) for s in sa)), -1)
    for b, s in enumerate(sa):
        for k, st in enumerate(s.steps):
            idx[b, st["start"]:st["end"]] = k
    want = process_advantages(torch.nan_to_num(r), idx, group_size=2, step_mask=torch.isfinite(r))
    for b, s in enumerate(sa):
        assert s.advantage == pytest.approx(want[b, :len(s.completion_ids)].tolist())
        assert s.advantage[sa[b].steps[0]["start"]] > 0 if b == 0 else s.advantage[0] < 0


def _multiturn_samples(tok, tool, rows):
    step, _ = _always_table(tok)
    ro = M.rollout_turns(step, tok, [encode_prompt(tok, r["prompt"]) for r in rows], tool, group_size=1)
    g = torch.Generator().manual_seed(0)
    for s in ro.samples:
        s.advantage = torch.randn(len(s.completion_ids), generator=g).tolist()
    return ro.samples


def _loss(hidden, weight, mb, n, old_logp=None):
    return grpo_loss(hidden, weight, mb.targets, mb.advantages, cu_seqlens=mb.cu_seqlens,
                     old_logp=old_logp, num_items_in_batch=n, backend="torch")[0]


def test_tool_tokens_get_no_loss_or_gradient(tok, tool, rows):
    samples = _multiturn_samples(tok, tool, rows)
    (mb,) = pack_sequences([s.prompt_ids for s in samples], [s.completion_ids for s in samples],
                           [s.advantage for s in samples], max_tokens=10 ** 9,
                           loss_masks=[s.loss_mask for s in samples])
    # the positions that predict a tool token, and those that predict a policy token
    cu = mb.cu_seqlens.tolist()
    tool_pos, policy_pos = [], []
    for k, i in enumerate(mb.seq_index.tolist()):
        s = samples[i]
        for j, m in enumerate(s.loss_mask):
            (policy_pos if m else tool_pos).append(cu[k] + len(s.prompt_ids) + j - 1)
    assert tool_pos and policy_pos
    assert (mb.targets[tool_pos] == -100).all() and (mb.targets[policy_pos] != -100).all()
    g = torch.Generator().manual_seed(1)
    L, D = mb.num_tokens, 16
    hidden = torch.randn(L, D, generator=g, dtype=torch.float64)
    weight = torch.randn(len(tok), D, generator=g, dtype=torch.float64)

    from fastgrpo.ops.logprobs import fused_logprobs
    # a fixed behaviour policy (old log-probs of the unperturbed states, shifted), so that the
    # loss value, not only its gradient, depends on every scored token's log-prob
    old = fused_logprobs(hidden, weight, mb.targets, backend="torch") - 0.05

    def run(h):
        h = h.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss = _loss(h, w, mb, len(samples), old_logp=old)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    base_loss, base_gh, base_gw = run(hidden)
    assert (base_gh[tool_pos] == 0).all()  # no gradient flows into a tool token's prediction
    bumped = hidden.clone()
    bumped[tool_pos] += 10 * torch.randn(len(tool_pos), D, generator=g, dtype=torch.float64)
    loss, gh, gw = run(bumped)
    assert loss == base_loss  # exactly: tool-token predictions are not in the loss
    keep = torch.ones(L, dtype=torch.bool)
    keep[tool_pos] = False
    assert torch.equal(gh[keep], base_gh[keep]) and torch.equal(gw, base_gw)
    # control: the same perturbation of one policy token's position does change them
    ctrl = hidden.clone()
    ctrl[policy_pos[3]] += 0.01 * torch.randn(D, generator=g, dtype=torch.float64)
    loss, gh, gw = run(ctrl)
    assert abs(float(loss - base_loss)) > 1e-9
    assert not torch.allclose(gh[policy_pos[3]], base_gh[policy_pos[3]]) and not torch.allclose(gw, base_gw)


def test_packing_multiturn_equals_per_sequence(tok, tool, rows):
    from fastgrpo.hf import backbone_hidden_states, lm_head_weight
    samples = _multiturn_samples(tok, tool, rows)
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=1024)
    n = float(len(samples))

    def grads_of(batches):
        model.zero_grad(set_to_none=True)
        total = 0.0
        for mb in batches:
            h = backbone_hidden_states(model, mb.input_ids, position_ids=mb.position_ids,
                                       cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen)[0]
            loss = _loss(h, lm_head_weight(model), mb, n)
            loss.backward()
            total += float(loss.detach())
        return total, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    args = ([s.prompt_ids for s in samples], [s.completion_ids for s in samples], [s.advantage for s in samples])
    masks = [s.loss_mask for s in samples]
    packed = pack_sequences(*args, max_tokens=10 ** 9, loss_masks=masks)
    alone = [mb for i in range(len(samples))
             for mb in pack_sequences(*[a[i:i + 1] for a in args], max_tokens=10 ** 9, loss_masks=masks[i:i + 1])]
    assert len(packed) == 1 and len(alone) == len(samples)
    lp, gp = grads_of(packed)
    la, ga = grads_of(alone)
    assert lp == pytest.approx(la, rel=1e-5, abs=1e-7)
    for k in gp:
        torch.testing.assert_close(gp[k], ga[k], rtol=1e-4, atol=1e-6)
    assert sum(int((mb.targets != -100).sum()) for mb in alone) == sum(sum(m) for m in masks)


def test_hf_step_fn_greedy_equals_generate_and_stops(tok):
    from fastgrpo.trainer.rollout import generate
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=1024)
    prompts = [encode_prompt(tok, "Origin question: Which city does Ann live in?"), encode_prompt(tok, "x")]
    want = generate(model, tok, prompts, do_sample=False, max_new_tokens=12).samples
    got = M.hf_step_fn(model, tok, max_new_tokens=12, do_sample=False, stops=())(prompts)
    assert [ids for ids, _ in got] == [s.completion_ids for s in want]
    # a stop string ends the step right after it
    text = tok.decode(want[0].completion_ids[:5])
    got = M.hf_step_fn(model, tok, max_new_tokens=12, do_sample=False, stops=(text[-3:],))(prompts[:1])
    assert tok.decode(got[0][0]).endswith(text[-3:]) and len(got[0][0]) <= 5
