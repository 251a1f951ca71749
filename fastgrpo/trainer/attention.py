"""Attention backends for packed (varlen) training rows, chosen automatically or by flag.

API::

    from fastgrpo.hf import backbone_hidden_states
    from fastgrpo.trainer.attention import select_attention, apply_attention

    backend = select_attention(cfg.attn_implementation, device)   # "auto" | "flash_attention_2"
                                                                  # | "xformers" | "sdpa" | "eager"
    apply_attention(model, backend)            # or from_pretrained(..., attn_implementation=backend)
    hidden = backbone_hidden_states(model, mb.input_ids, position_ids=mb.position_ids,
                                    cu_seqlens=mb.cu_seqlens, max_seqlen=mb.max_seqlen)
    # varlen backends get the row's cu_seq_lens (fastgrpo.hf.packed_attention_kwargs)

Backends (``select_attention`` returns the transformers ``attn_implementation`` name):

=====================  ==========  =====================================================
name                   devices     packed rows
=====================  ==========  =====================================================
``flash_attention_2``  CUDA        ``flash_attn_varlen_func`` on ``cu_seq_lens_q/k`` and
                                   ``max_length_q/k`` (given: no host sync per layer)
``xformers``           CUDA        ``memory_efficient_attention`` with a
                                   ``BlockDiagonalCausalMask.from_seqlens`` bias; registered
                                   here with ``transformers.AttentionInterface`` (transformers
                                   has no xformers path of its own)
``sdpa``               any         transformers builds a block-diagonal causal mask from
                                   ``position_ids`` restarting at 0 (no ``attention_mask``!)
``eager``              any         same mask, plain matmul softmax (reference)
=====================  ==========  =====================================================

``"auto"``: flash_attention_2 on CUDA when flash-attn imports, else xformers on CUDA when its
CUDA kernels run, else sdpa.  Asking for a backend that cannot run raises
``AttentionBackendError`` saying why (not installed: the pip command; no CUDA: says so).

Why position_ids for sdpa/eager: transformers 5.x detects packed rows from position ids that
restart at 0 when no attention mask and no cache are given, and keeps sequences apart; any
attention mask or a cache silently lets them attend to each other.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch

__all__ = [
    "ALIASES",
    "BACKENDS",
    "XFORMERS_NAME",
    "AttentionBackendError",
    "apply_attention",
    "available_backends",
    "register_xformers",
    "select_attention",
    "xformers_attention_forward",
]

BACKENDS = ("flash_attention_2", "xformers", "sdpa", "eager")
XFORMERS_NAME = "xformers"
ALIASES = {"flash": "flash_attention_2", "fa2": "flash_attention_2", "flash_attn": "flash_attention_2",
            "flash-attn": "flash_attention_2", "flash_attention_2": "flash_attention_2",
            "xformers": "xformers", "sdpa": "sdpa", "eager": "eager", "auto": "auto"}

FLASH_INSTALL = ("pip install flash-attn --no-build-isolation  (builds from source against "
                 "your CUDA torch; takes long)")
XFORMERS_INSTALL = "pip install xformers  (a wheel built for your exact torch and CUDA versions)"


class AttentionBackendError(RuntimeError):
    """A requested attention backend cannot run here (the message says why and what to do)."""


def _is_cuda(device) -> bool:
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


@functools.cache
def _flash_status() -> str | None:
    """None when flash-attn imports, else why not."""
    if importlib.util.find_spec("flash_attn") is None:
        return f"flash-attn is not installed; {FLASH_INSTALL}"
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ABI mismatch, missing CUDA libs, ...
        return f"flash-attn is installed but does not load ({type(e).__name__}: {e}); reinstall it for this torch: {FLASH_INSTALL}"
    return None


@functools.cache
def _xformers_status(check_kernel: bool) -> str | None:
    """None when xformers imports (and, with ``check_kernel``, its CUDA kernel runs)."""
    if importlib.util.find_spec("xformers") is None:
        return f"xformers is not installed; {XFORMERS_INSTALL}"
    try:
        import xformers.ops as xops
        from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask
    except Exception as e:  # noqa: BLE001
        return f"xformers is installed but does not import ({type(e).__name__}: {e}); {XFORMERS_INSTALL}"
    if check_kernel:
        try:
            q = torch.randn(1, 6, 2, 16, device="cuda", dtype=torch.float16)
            bias = BlockDiagonalCausalMask.from_seqlens([2, 4])
            xops.memory_efficient_attention(q, q, q, attn_bias=bias)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - built for another torch/CUDA
            return (f"xformers imports but its CUDA kernels do not run with torch "
                    f"{torch.__version__} ({type(e).__name__}: {str(e)[:200]}); {XFORMERS_INSTALL}")
    return None


def available_backends(device=None) -> list[str]:
    """The backends that can run on ``device``, best first."""
    out = []
    if _is_cuda(device):
        if _flash_status() is None:
            out.append("flash_attention_2")
        if _xformers_status(True) is None:
            out.append("xformers")
    return out + ["sdpa", "eager"]


def select_attention(requested: str = "auto", device=None) -> str:
    """Resolve ``requested`` ("auto", a backend name or alias) for ``device`` (default: CUDA
    if available).  Raises ``AttentionBackendError`` when the requested backend cannot run.
    Selecting ``xformers`` registers it with transformers (``register_xformers``)."""
    key = ALIASES.get(str(requested).lower())
    if key is None:
        raise AttentionBackendError(f"unknown attention backend {requested!r}; choose one of "
                                    f"auto, {', '.join(BACKENDS)}")
    cuda = _is_cuda(device)
    if key == "auto":
        if cuda and _flash_status() is None:
            return "flash_attention_2"
        if cuda and _xformers_status(True) is None:
            register_xformers()
            return XFORMERS_NAME
        return "sdpa"
    if key == "flash_attention_2":
        why = _flash_status()
        if why:
            raise AttentionBackendError(why)
        if not cuda:
            raise AttentionBackendError(f"flash_attention_2 needs CUDA (device {device!r}); "
                                        f"use sdpa or eager on this device")
        return key
    if key == "xformers":
        why = _xformers_status(False)
        if why:
            raise AttentionBackendError(why)
        if not cuda:
            raise AttentionBackendError(f"xformers attention needs CUDA (device {device!r}); its "
                                        f"kernels are CUDA-only: use sdpa or eager on this device")
        why = _xformers_status(True)
        if why:
            raise AttentionBackendError(why)
        register_xformers()
        return XFORMERS_NAME
    return key


def apply_attention(model, backend: str):
    """Switch a loaded transformers model to ``backend`` (a name from ``select_attention``)."""
    if backend == XFORMERS_NAME:
        register_xformers()
    try:
        model.set_attn_implementation(backend)
    except (AttributeError, ValueError, ImportError):
        model.config._attn_implementation = backend
    return model


# ----------------------------------------------------------------------------- xformers


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _seqlens_from_position_ids(position_ids: torch.Tensor) -> list[int]:
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [pos.numel()]
    return [e - s for s, e in zip(starts, ends)]


def xformers_attention_forward(module, query, key, value, attention_mask, scaling=None,
                               dropout: float = 0.0, **kwargs):
    """transformers attention function: packed rows through xformers' block-diagonal kernel.

    ``query/key/value``: ``[B, H, L, Dh]`` (transformers' layout).  With ``cu_seq_lens_q`` in
    kwargs (see ``packed_attention_kwargs``) or position ids restarting at 0, and B == 1, the
    row is split by ``BlockDiagonalCausalMask.from_seqlens``; with an attention mask or a KV
    cache (generation), falls back to transformers' sdpa.  Returns ``([B, L, H, Dh], None)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, kv_len = query.shape[2], key.shape[2]
    cu = kwargs.get("cu_seq_lens_q")
    packed = cu is not None or (attention_mask is None and query.shape[0] == 1 and q_len == kv_len)
    if not packed or (attention_mask is not None and cu is None) or q_len != kv_len \
            or query.shape[0] != 1:
        kwargs.pop("cu_seq_lens_q", None), kwargs.pop("cu_seq_lens_k", None)
        kwargs.pop("max_length_q", None), kwargs.pop("max_length_k", None)
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

    if cu is not None:
        seqlens = (cu[1:] - cu[:-1]).tolist()
    elif kwargs.get("position_ids") is not None:
        seqlens = _seqlens_from_position_ids(kwargs["position_ids"])
    else:
        seqlens = [q_len]
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [1, L, H, Dh]
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    out = xops.memory_efficient_attention(q, k, v, attn_bias=BlockDiagonalCausalMask.from_seqlens(seqlens),
                                          p=dropout if module.training else 0.0, scale=scaling)
    return out.contiguous(), None


def register_xformers(name: str = XFORMERS_NAME) -> str:
    """Register ``xformers_attention_forward`` with ``transformers.AttentionInterface`` under
    ``name`` (idempotent); the mask interface gets sdpa's mask builder so generation with
    padding still gets its mask (and falls back to sdpa)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(name, xformers_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name
