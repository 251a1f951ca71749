"""Every ```python block of README.md runs, each in a fresh namespace.

Blocks that import TRL are skipped when TRL is not installed (``pip install "fastgrpo[trl]"``).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks():
    text = README.read_text(encoding="utf-8")
    out, heading = [], "top"
    for m in re.finditer(r"^(#{1,6} [^\n]*)$|^```python[^\n]*\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("#").strip()
            continue
        line = text.count("\n", 0, m.start()) + 1
        name = re.sub(r"[^A-Za-z0-9]+", "-", heading).strip("-")[:40]
        out.append(pytest.param(m.group(2), id=f"L{line}-{name}"))
    return out


BLOCKS = _blocks()


def test_readme_has_examples():
    assert BLOCKS, "README.md has no ```python blocks"
    assert any("## Using the fused loss in your trainer" in line
               for line in README.read_text(encoding="utf-8").splitlines())


@pytest.mark.parametrize("code", BLOCKS)
def test_readme_example_runs(code, tmp_path, monkeypatch):
    """Exec the block as ``__main__`` in a fresh namespace (in-process: the heavy imports are
    paid once per session), from an empty working directory, restoring torch's global state."""
    if re.search(r"^\s*(from|import) trl\b|fastgrpo\.integrations\.trl", code, re.M) \
            and importlib.util.find_spec("trl") is None:
        pytest.skip('needs TRL: pip install "fastgrpo[trl]"')
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    rng, dtype, grad = torch.get_rng_state(), torch.get_default_dtype(), torch.is_grad_enabled()
    script = tmp_path / "readme_example.py"
    script.write_text(code, encoding="utf-8")
    try:
        exec(compile(code, str(script), "exec"), {"__name__": "__main__", "__file__": str(script)})
    finally:
        torch.set_rng_state(rng)
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
