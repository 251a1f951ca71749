"""C++ sources of fastgrpo's native CPU kernels (``fastgrpo_cpu.cpp``), shipped as package data
and compiled on first use by ``fastgrpo.ops._native`` (a JIT build through
``torch.utils.cpp_extension``, cached per user).  Nothing here is imported at run time but the
folder's path."""
