"""The checkout's root must not shadow installed packages.

``python -m fastgrpo.train`` and pytest put the checkout's root first on ``sys.path``.  A folder
there that is a regular package shadows any installed distribution of the same name:
``kernels/__init__.py`` once hid the PyPI package ``kernels`` that transformers 5.2x imports, and
every model import failed on a fresh machine (docs/layout.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PROBE = r"""
import importlib.util, json
import transformers.activations            # imports the PyPI package `kernels` (transformers 5.2x)
import fastgrpo_kernels
spec = importlib.util.find_spec("kernels")
print(json.dumps({
    "kernels": None if spec is None else list(spec.submodule_search_locations or [spec.origin]),
    "fastgrpo_kernels": fastgrpo_kernels.__file__,
}))
"""


def test_kernels_name_is_not_shadowed_from_the_root():
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    # `kernels` is absent or installed elsewhere, never (a portion of) the checkout's folder.
    for location in found["kernels"] or []:
        assert not Path(location).resolve().is_relative_to(ROOT), location
    # the project's own kernels still import, from the checkout's kernels/ folder
    assert Path(found["fastgrpo_kernels"]).resolve().is_relative_to(ROOT / "kernels")


def test_no_regular_package_at_the_root_but_fastgrpo():
    """Static form of the same rule: the only importable package at the root is fastgrpo."""
    packages = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
    assert packages == ["fastgrpo"], packages
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "fastgrpo_kernels" / "__init__.py").is_file()
