"""Test-session set-up.

Triton's interpreter works only if triton itself is first imported with TRITON_INTERPRET=1
(its language functions are bound at import), so the variable is set here, before any test
module imports triton.  Kernel *compilation* checks (test_kernels_compile.py) strip it in
their own subprocesses.  The CPU default backend stays ``torch``: only tests that ask for
``backend="triton"`` run the interpreted kernels.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402  (after the environment variable, on purpose)
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """One torch thread for the test (the tiny trainer is fastest so on the 2-core CI)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["native", "torch"])
def native_mode(request, monkeypatch):
    """Run a kernel test through the native CPU kernels (csrc/, built on first use) and through
    the plain torch fallback.  The native case skips where the kernels cannot build, unless
    FASTGRPO_NATIVE=1 (CI) makes that an error; FASTGRPO_NATIVE=0 runs the fallback only."""
    import fastgrpo.ops.blocks as blocks_mod
    from fastgrpo.ops._native import native
    if request.param == "torch":
        monkeypatch.setattr(blocks_mod, "_native_for", lambda h: None)
    elif native() is None:
        pytest.skip("native CPU kernels not built (FASTGRPO_NATIVE=0 or no compiler)")
    return request.param
