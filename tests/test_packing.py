"""First-fit-decreasing packing and packed == per-sequence model outputs."""

import pytest
import torch

from fastgrpo.ops.logprobs import fused_logprobs
from fastgrpo.hf import backbone_hidden_states, lm_head_weight
from fastgrpo.tasks.tiny_model import build_tiny_model
from fastgrpo.trainer.packing import ffd_bins, pack_sequences, unpack_per_token


def test_ffd_hand_worked_example():
    # lengths 5 4 3 3 2 2 1 (total 20) into bins of 8, longest first, first bin with room:
    # 5 -> A(3 left); 4 -> B(4); 3 -> A(0); 3 -> B(1); 2 -> C(6); 2 -> C(4); 1 -> B(0)
    lengths = [5, 4, 3, 3, 2, 2, 1]
    assert ffd_bins(lengths, 8) == [[0, 2], [1, 3, 6], [4, 5]]
    # unsorted input, ties keep input order
    assert ffd_bins([2, 5, 2, 3], 5) == [[1], [3, 0], [2]]
    # an oversize sequence gets a bin of its own
    assert ffd_bins([10, 3, 3], 6) == [[0], [1, 2]]
    with pytest.raises(ValueError, match="max_tokens"):
        ffd_bins([1], 0)


def _random_batch(n=7, seed=0, vocab=97):
    g = torch.Generator().manual_seed(seed)
    P = [torch.randint(0, vocab, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
         for _ in range(n)]
    C = [torch.randint(0, vocab, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
         for _ in range(n)]
    return P, C


def test_layout_no_token_lost():
    P, C = _random_batch(9)
    adv = [float(i) - 4 for i in range(9)]
    batches = pack_sequences(P, C, adv, max_tokens=40)
    seen = sorted(i for mb in batches for i in mb.seq_index.tolist())
    assert seen == list(range(9))
    assert sum(mb.num_tokens for mb in batches) == sum(len(p) + len(c) for p, c in zip(P, C))
    assert sum(mb.num_loss_tokens for mb in batches) == sum(len(c) for c in C)
    for mb in batches:
        assert mb.num_tokens <= 40 or mb.num_sequences == 1
        assert mb.input_ids.shape == mb.position_ids.shape == (1, mb.num_tokens)
        assert mb.cu_seqlens.dtype == torch.int32 and mb.cu_seqlens[-1] == mb.num_tokens
        cu = mb.cu_seqlens.tolist()
        for k, i in enumerate(mb.seq_index.tolist()):
            sl = slice(cu[k], cu[k + 1])
            assert mb.input_ids[0, sl].tolist() == P[i] + C[i]
            assert mb.position_ids[0, sl].tolist() == list(range(len(P[i]) + len(C[i])))
            t = mb.targets[sl].tolist()
            # prompt positions but the last, and the sequence's last position: ignored
            assert t == [-100] * (len(P[i]) - 1) + C[i] + [-100]
            a = mb.advantages[sl].tolist()
            assert a == [0.0] * (len(P[i]) - 1) + [adv[i]] * len(C[i]) + [0.0]
        assert mb.max_seqlen == max(cu[k + 1] - cu[k] for k in range(len(cu) - 1))
    # per-token results map back to their sequences' completion tokens, in order
    back = unpack_per_token(batches, [mb.targets.float() for mb in batches], len(P))
    assert [b.long().tolist() for b in back] == C


def test_per_token_advantages_and_errors():
    P, C = [[1, 2], [3]], [[4, 5, 6], [7, 8]]
    (mb,) = pack_sequences(P, C, [[0.1, 0.2, 0.3], torch.tensor([1.0, 2.0])], max_tokens=100)
    back = unpack_per_token([mb], [mb.advantages], 2)
    assert back[0].tolist() == pytest.approx([0.1, 0.2, 0.3]) and back[1].tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="per-token advantages"):
        pack_sequences(P, C, [[0.1], [1.0, 2.0]], max_tokens=100)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        pack_sequences(P, C[:1], None, max_tokens=100)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logprobs_equal_unpacked(attn):
    torch.manual_seed(0)
    model = build_tiny_model(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4,
                             attn_implementation=attn).eval()
    P, C = _random_batch(8, seed=1)
    batches = pack_sequences(P, C, None, max_tokens=48)
    assert len(batches) > 1 and any(mb.num_sequences > 1 for mb in batches)
    w = lm_head_weight(model)
    with torch.no_grad():
        packed = []
        for mb in batches:
            h = backbone_hidden_states(model, mb.input_ids, position_ids=mb.position_ids,
                                       cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen)[0]
            packed.append(fused_logprobs(h, w, mb.targets))
        per_seq = unpack_per_token(batches, packed, len(P))
        for i, (p, c) in enumerate(zip(P, C)):
            ids = torch.tensor([p + c])
            logits = model(input_ids=ids).logits[0].double().log_softmax(-1)  # unpacked, full head
            ref = logits[:-1].gather(1, ids[0, 1:, None])[:, 0][len(p) - 1:]
            torch.testing.assert_close(per_seq[i].double(), ref, atol=1e-5, rtol=1e-5)


def test_attention_mask_would_leak():
    """Sanity check of the premise: the restart of position_ids is what separates sequences."""
    torch.manual_seed(0)
    model = build_tiny_model(vocab_size=97, hidden_size=32, num_layers=1, num_heads=4).eval()
    P, C = [[1, 2, 3], [4, 5, 6]], [[7, 8], [9, 10]]
    (mb,) = pack_sequences(P, C, None, max_tokens=100)
    with torch.no_grad():
        ok = backbone_hidden_states(model, mb.input_ids, position_ids=mb.position_ids)[0]
        cont = backbone_hidden_states(model, mb.input_ids, position_ids=torch.arange(mb.num_tokens)[None])[0]
        alone = backbone_hidden_states(model, torch.tensor([P[1] + C[1]]), position_ids=torch.arange(5)[None])[0]
    k = mb.seq_index.tolist().index(1)
    sl = slice(int(mb.cu_seqlens[k]), int(mb.cu_seqlens[k + 1]))
    torch.testing.assert_close(ok[sl], alone, atol=1e-5, rtol=1e-5)
    if k == 1:  # second in the row: with continuing positions it sees the first sequence
        assert not torch.allclose(cont[sl], alone, atol=1e-3)
