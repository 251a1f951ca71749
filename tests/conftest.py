"""Test-session set-up.

Triton's interpreter works only if triton itself is first imported with TRITON_INTERPRET=1
(its language functions are bound at import), so the variable is set here, before any test
module imports triton.  Kernel *compilation* checks (test_kernels_compile.py) strip it in
their own subprocesses.  The CPU default backend stays ``torch``: only tests that ask for
``backend="triton"`` run the interpreted kernels.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
