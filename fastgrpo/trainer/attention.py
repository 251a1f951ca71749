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
``torch_varlen``       CUDA        PyTorch's own ``torch.nn.attention.varlen.varlen_attn``
                                   (torch >= 2.10, fp16/bf16, sm80+: flash kernels shipped
                                   with torch; fp32 rows go through ``sdpa_varlen``)
``xformers``           CUDA        ``memory_efficient_attention`` with a
                                   ``BlockDiagonalCausalMask.from_seqlens`` bias; registered
                                   here with ``transformers.AttentionInterface`` (transformers
                                   has no xformers path of its own)
``sdpa_varlen``        any         causal SDPA per sequence of the row (split at
                                   ``cu_seq_lens_q``, or where ``position_ids`` restart):
                                   cost sum(L_i^2), no ``[L, L]`` mask is ever built
``sdpa``               any         dense: transformers builds a block-diagonal causal mask
                                   ``[L, L]`` from ``position_ids`` restarting at 0 (cost L^2)
``eager``              any         same mask, plain matmul softmax (reference)
=====================  ==========  =====================================================

``"auto"``: on CUDA flash_attention_2 when flash-attn imports, else torch_varlen when torch's
varlen kernel runs, else xformers when its CUDA kernels run, else sdpa_varlen; elsewhere
sdpa_varlen.  The dense-mask paths (sdpa, eager) run only when asked for by name.  Every
varlen backend hands anything that is not a packed causal row (generation with a KV cache or
a padding mask, a vision tower's bidirectional attention) to transformers' sdpa.  Asking for a backend that cannot run raises
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
    "SDPA_VARLEN_NAME",
    "TORCH_VARLEN_NAME",
    "XFORMERS_NAME",
    "AttentionBackendError",
    "apply_attention",
    "available_backends",
    "packed_seqlens",
    "register_sdpa_varlen",
    "register_torch_varlen",
    "register_xformers",
    "sdpa_varlen_attention_forward",
    "select_attention",
    "torch_varlen_attention_forward",
    "xformers_attention_forward",
]

BACKENDS = ("flash_attention_2", "torch_varlen", "xformers", "sdpa_varlen", "sdpa", "eager")
XFORMERS_NAME = "xformers"
TORCH_VARLEN_NAME = "torch_varlen"
SDPA_VARLEN_NAME = "sdpa_varlen"
ALIASES = {"flash": "flash_attention_2", "fa2": "flash_attention_2", "flash_attn": "flash_attention_2",
           "flash-attn": "flash_attention_2", "flash_attention_2": "flash_attention_2",
           "torch_varlen": "torch_varlen", "varlen": "torch_varlen", "varlen_attn": "torch_varlen",
           "xformers": "xformers", "sdpa_varlen": "sdpa_varlen", "sdpa": "sdpa", "eager": "eager",
           "auto": "auto"}

FLASH_INSTALL = ("pip install flash-attn --no-build-isolation  (builds from source against "
                 "your CUDA torch; takes long)")
XFORMERS_INSTALL = "pip install xformers  (a wheel built for your exact torch and CUDA versions)"
TORCH_VARLEN_NEEDS = "torch >= 2.10 with CUDA (torch.nn.attention.varlen.varlen_attn)"


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


@functools.cache
def _torch_varlen_status(check_kernel: bool) -> str | None:
    """None when ``torch.nn.attention.varlen.varlen_attn`` exists (and, with ``check_kernel``,
    runs a tiny causal bf16 row on CUDA: flash kernels need sm80+)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except Exception:  # noqa: BLE001 - torch < 2.10
        return f"torch {torch.__version__} has no torch.nn.attention.varlen; needs {TORCH_VARLEN_NEEDS}"
    if check_kernel:
        try:
            q = torch.randn(6, 2, 16, device="cuda", dtype=torch.bfloat16)
            cu = torch.tensor([0, 2, 6], device="cuda", dtype=torch.int32)
            _varlen_call(q, q, q, cu, 4, scale=0.25)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - no CUDA, an old GPU, a CPU build
            return (f"torch.nn.attention.varlen.varlen_attn does not run here "
                    f"({type(e).__name__}: {str(e)[:200]}); needs {TORCH_VARLEN_NEEDS}")
    return None


def available_backends(device=None) -> list[str]:
    """The backends that can run on ``device``, best first."""
    out = []
    if _is_cuda(device):
        if _flash_status() is None:
            out.append("flash_attention_2")
        if _torch_varlen_status(True) is None:
            out.append(TORCH_VARLEN_NAME)
        if _xformers_status(True) is None:
            out.append("xformers")
    return out + [SDPA_VARLEN_NAME, "sdpa", "eager"]


def select_attention(requested: str = "auto", device=None) -> str:
    """Resolve ``requested`` ("auto", a backend name or alias) for ``device`` (default: CUDA
    if available).  Raises ``AttentionBackendError`` when the requested backend cannot run.
    Selecting a backend fastgrpo implements (torch_varlen, xformers, sdpa_varlen) registers it
    with transformers."""
    key = ALIASES.get(str(requested).lower())
    if key is None:
        raise AttentionBackendError(f"unknown attention backend {requested!r}; choose one of "
                                    f"auto, {', '.join(BACKENDS)}")
    cuda = _is_cuda(device)
    if key == "auto":
        if cuda and _flash_status() is None:
            return "flash_attention_2"
        if cuda and _torch_varlen_status(True) is None:
            return register_torch_varlen()
        if cuda and _xformers_status(True) is None:
            return register_xformers()
        return register_sdpa_varlen()
    if key == "flash_attention_2":
        why = _flash_status()
        if why:
            raise AttentionBackendError(why)
        if not cuda:
            raise AttentionBackendError(f"flash_attention_2 needs CUDA (device {device!r}); "
                                        f"use sdpa_varlen on this device")
        return key
    if key in (TORCH_VARLEN_NAME, XFORMERS_NAME):  # installed? CUDA? do its kernels run?
        status = _torch_varlen_status if key == TORCH_VARLEN_NAME else _xformers_status
        why = status(False)
        if why:
            raise AttentionBackendError(why)
        if not cuda:
            raise AttentionBackendError(f"{key} needs CUDA (device {device!r}): its kernels are "
                                        f"CUDA-only; use sdpa_varlen on this device")
        why = status(True)
        if why:
            raise AttentionBackendError(why)
        return _REGISTER[key]()
    if key == SDPA_VARLEN_NAME:
        return register_sdpa_varlen()
    return key


_REGISTER = {}  # name -> register function (filled below)


def apply_attention(model, backend: str):
    """Switch a loaded transformers model to ``backend`` (a name from ``select_attention``)."""
    if backend in _REGISTER:
        _REGISTER[backend]()
    try:
        model.set_attn_implementation(backend)
    except (AttributeError, ValueError, ImportError):
        model.config._attn_implementation = backend
    return model


# ----------------------------------------------------------------------------- packed rows

_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _seqlens_from_position_ids(position_ids: torch.Tensor) -> list[int]:
    pos = position_ids.reshape(-1)
    starts = (pos == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [pos.numel()]
    return [e - s for s, e in zip(starts, ends)]


def packed_seqlens(module, query, key, attention_mask, is_causal=None, **kwargs) -> list[int] | None:
    """The sequence lengths of a packed causal row, or None when the call is anything else.

    A packed row: one row (``B == 1``), no attention mask, as many queries as keys (no KV
    cache offset), causal attention.  Its boundaries come from ``cu_seq_lens_q`` (see
    ``fastgrpo.hf.packed_attention_kwargs``), else from 2-D ``position_ids`` restarting at 0,
    else the row is one sequence.  Everything else (generation with a cache or a padding mask,
    a vision tower's bidirectional attention: ``is_causal=False``) returns None."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if (not causal or attention_mask is not None or query.shape[0] != 1
            or query.shape[2] != key.shape[2]):
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return (cu[1:] - cu[:-1]).tolist()
    pos = kwargs.get("position_ids")
    if pos is not None and pos.dim() == 2 and pos.shape[0] == 1 and pos.shape[1] == query.shape[2]:
        return _seqlens_from_position_ids(pos)
    return [query.shape[2]]


def _dense_sdpa(module, query, key, value, attention_mask, *, scaling, dropout, **kwargs):
    """transformers' own sdpa attention (the mask, if any, from ``sdpa_mask``)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    for k in _VARLEN_KWARGS:
        kwargs.pop(k, None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _varlen_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None,
                 **kwargs):
    """Mask builder of the varlen backends (transformers' ``AttentionMaskInterface``): no mask
    at all for a single unpadded row without cache offset (the attention function splits it
    into its sequences), else transformers' ``sdpa_mask``, so generation with padding or a
    cache keeps its mask."""
    from transformers.masking_utils import sdpa_mask

    if (attention_mask is None and batch_size == 1 and q_length == kv_length
            and not int(q_offset) and not int(kv_offset)):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)


def _register(name: str, fn) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(name, fn)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, _varlen_mask)
    return name


# ----------------------------------------------------------------------------- sdpa_varlen


def _band(n: int, window: int, device) -> torch.Tensor:
    """Causal sliding-window mask of one sequence (transformers' convention: key j is seen by
    query i when i - window < j <= i)."""
    i = torch.arange(n, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def sdpa_varlen_attention_forward(module, query, key, value, attention_mask, scaling=None,
                                  dropout: float = 0.0, is_causal=None, **kwargs):
    """transformers attention function: a packed row as causal SDPA per sequence.

    ``query/key/value``: ``[1, H, L, Dh]`` (``H_kv`` may divide ``H``: grouped-query).  The
    row is split at its sequence boundaries (``packed_seqlens``) and each sequence runs alone,
    so the cost is sum(L_i^2) and no ``[L, L]`` mask exists.  Anything that is not a packed
    causal row goes to transformers' sdpa.  Returns ``([B, L, H, Dh], None)``.
    """
    groups = kwargs.pop("shared_prefix_groups", None)
    seqlens = packed_seqlens(module, query, key, attention_mask, is_causal, **kwargs)
    if seqlens is None:
        if groups is not None:
            raise ValueError("shared_prefix_groups needs a packed causal row (one row, no mask, no cache)")
        return _dense_sdpa(module, query, key, value, attention_mask, scaling=scaling,
                           dropout=dropout, is_causal=is_causal, **kwargs)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    p = dropout if module.training else 0.0
    window = kwargs.get("sliding_window")
    gqa = query.shape[1] != key.shape[1]
    if groups is not None:
        if window:
            raise ValueError("shared_prefix_groups does not support sliding-window attention")
        return _shared_prefix_sdpa(query, key, value, groups, scaling, p, gqa), None
    outs, start = [], 0
    for n in seqlens:
        sl = slice(start, start + n)
        start += n
        q, k, v = query[:, :, sl], key[:, :, sl], value[:, :, sl]
        mask = _band(n, window, query.device) if window and n > window else None
        outs.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=mask is None, scale=scaling,
            enable_gqa=gqa))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    return out.transpose(1, 2).contiguous(), None


def _shared_prefix_sdpa(query, key, value, groups, scaling, p, gqa):
    """A row in ``fastgrpo.trainer.prefix``'s shared-prompt layout: each prompt causal over
    itself, each completion over its prompt (all of it) and causally over itself."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    outs = []
    for ps, pl, comps in groups:
        pk, pv = key[:, :, ps:ps + pl], value[:, :, ps:ps + pl]
        outs.append(sdpa(query[:, :, ps:ps + pl], pk, pv, dropout_p=p, is_causal=True,
                         scale=scaling, enable_gqa=gqa))
        for cs, cl in comps:
            k = torch.cat([pk, key[:, :, cs:cs + cl]], 2)
            v = torch.cat([pv, value[:, :, cs:cs + cl]], 2)
            i = torch.arange(cl, device=query.device)
            mask = torch.cat([torch.ones(cl, pl, dtype=torch.bool, device=query.device),
                              i[:, None] >= i[None, :]], 1)
            outs.append(sdpa(query[:, :, cs:cs + cl], k, v, attn_mask=mask, dropout_p=p,
                             scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, 2).transpose(1, 2).contiguous()


def register_sdpa_varlen(name: str = SDPA_VARLEN_NAME) -> str:
    """Register ``sdpa_varlen_attention_forward`` (and its mask builder: none for packed rows)
    with transformers under ``name`` (idempotent)."""
    return _register(name, sdpa_varlen_attention_forward)


# ----------------------------------------------------------------------------- torch_varlen


@functools.cache
def _varlen_params() -> frozenset:
    import inspect

    from torch.nn.attention.varlen import varlen_attn
    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen_call(q, k, v, cu, max_len, *, scale, window=None):
    """``varlen_attn`` on ``[T, H, Dh]`` tensors, causal: torch 2.10 takes ``is_causal``,
    later versions ``window_size=(left, 0)``; GQA through ``enable_gqa`` where it exists."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_params()
    kw = {"scale": scale}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if "window_size" in params:
        kw["window_size"] = (window - 1 if window else -1, 0)
    else:
        if window:
            raise AttentionBackendError(f"torch {torch.__version__}'s varlen_attn has no sliding window")
        kw["is_causal"] = True
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


def _varlen_kernel_runs(query: torch.Tensor) -> bool:
    """torch's varlen flash kernels: CUDA tensors in fp16/bf16 only."""
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)


def torch_varlen_attention_forward(module, query, key, value, attention_mask, scaling=None,
                                   dropout: float = 0.0, is_causal=None, **kwargs):
    """transformers attention function: a packed row through PyTorch's
    ``torch.nn.attention.varlen.varlen_attn`` (flash kernels; CUDA, fp16/bf16).  fp32 rows,
    non-CUDA tensors and dropout go through ``sdpa_varlen_attention_forward``; anything that
    is not a packed causal row through transformers' sdpa.  Returns ``([1, L, H, Dh], None)``."""
    seqlens = packed_seqlens(module, query, key, attention_mask, is_causal, **kwargs)
    if seqlens is None or not _varlen_kernel_runs(query) or (dropout and module.training):
        return sdpa_varlen_attention_forward(module, query, key, value, attention_mask, scaling,
                                             dropout, is_causal, **kwargs)
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        cu = torch.tensor([0] + seqlens, device=query.device).cumsum(0)
    max_len = kwargs.get("max_length_q") or max(seqlens)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [L, H, Dh]
    out = _varlen_call(q, k, v, cu.to(torch.int32), int(max_len), scale=scaling,
                       window=kwargs.get("sliding_window"))
    return out[None], None


def register_torch_varlen(name: str = TORCH_VARLEN_NAME) -> str:
    """Register ``torch_varlen_attention_forward`` with transformers under ``name``."""
    return _register(name, torch_varlen_attention_forward)


# ----------------------------------------------------------------------------- xformers


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def xformers_attention_forward(module, query, key, value, attention_mask, scaling=None,
                               dropout: float = 0.0, is_causal=None, **kwargs):
    """transformers attention function: packed rows through xformers' block-diagonal kernel.

    ``query/key/value``: ``[B, H, L, Dh]`` (transformers' layout).  A packed causal row
    (``packed_seqlens``: boundaries from ``cu_seq_lens_q`` or restarting position ids) is
    split by ``BlockDiagonalCausalMask.from_seqlens``; anything else (an attention mask, a KV
    cache) falls back to transformers' sdpa.  Returns ``([B, L, H, Dh], None)``.
    """
    seqlens = packed_seqlens(module, query, key, attention_mask, is_causal, **kwargs)
    if seqlens is None:
        return _dense_sdpa(module, query, key, value, attention_mask, scaling=scaling,
                           dropout=dropout, is_causal=is_causal, **kwargs)
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalMask

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
    ``name`` (idempotent), with the varlen mask builder (no mask for packed rows, sdpa's for
    generation with padding or a cache)."""
    return _register(name, xformers_attention_forward)


_REGISTER.update({SDPA_VARLEN_NAME: register_sdpa_varlen, TORCH_VARLEN_NAME: register_torch_varlen,
                  XFORMERS_NAME: register_xformers})
