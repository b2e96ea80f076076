"""The one dispatch point between Triton kernels (``csrc_triton``) and torch references.

Backend rule: Triton for CUDA tensors, the pure-torch reference (``reference.py``) elsewhere.
Force either path with the environment variable ``POWERSAMPLE_FAST_BACKEND=triton|torch`` (read at
call time) or with ``set_backend("triton"|"torch"|"auto")``. Forcing "triton" on CPU tensors needs
``TRITON_INTERPRET=1`` set before ``csrc_triton`` is first imported.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import reference
from .errors import ConfigError

_BACKENDS = ("auto", "triton", "torch")
_forced: Optional[str] = None


def set_backend(name: str) -> None:
    """Force the kernel backend for this process: "auto" (default), "triton" or "torch"."""
    global _forced
    if name not in _BACKENDS:
        raise ConfigError(f"unknown backend {name!r}; choose one of {', '.join(_BACKENDS)}")
    _forced = None if name == "auto" else name


def backend_for(t: torch.Tensor) -> str:
    """"triton" or "torch" for an op on tensor ``t`` under the current settings."""
    name = _forced or os.environ.get("POWERSAMPLE_FAST_BACKEND", "auto").lower()
    if name not in _BACKENDS:
        raise ConfigError(
            f"POWERSAMPLE_FAST_BACKEND={name!r} is not valid; use one of {', '.join(_BACKENDS)}"
        )
    if name == "auto":
        return "triton" if t.is_cuda and _triton_available() else "torch"
    return name


def _triton_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _kernels():
    try:
        import csrc_triton
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigError(
            f"the Triton backend was requested but csrc_triton could not be imported ({e}); "
            "install triton or set POWERSAMPLE_FAST_BACKEND=torch"
        ) from e
    return csrc_triton


def topk_threshold(logits, top_k):
    return reference.topk_threshold(logits, top_k)


def sample_logprobs(logits, keys, inv_tau, threshold=None):
    if backend_for(logits) == "triton":
        return _kernels().sample_logprobs(logits, keys, inv_tau, threshold)
    return reference.sample_logprobs(logits, keys, inv_tau, threshold)


def gather_logprobs(logits, tokens, inv_tau, threshold=None):
    if backend_for(logits) == "triton":
        return _kernels().gather_logprobs(logits, tokens, inv_tau, threshold)
    return reference.gather_logprobs(logits, tokens, inv_tau, threshold)


def kv_copy_(kv, src, dst, start, length):
    if backend_for(kv) == "triton":
        return _kernels().kv_copy_(kv, src, dst, start, length)
    return reference.kv_copy_(kv, src, dst, start, length)


def mh_accept_(cur_tok, cur_lp, cur_lq, cur_len, prop_tok, prop_lp, prop_lq, prop_len,
               rows, cut, base, log_u, alpha):
    args = (cur_tok, cur_lp, cur_lq, cur_len, prop_tok, prop_lp, prop_lq, prop_len,
            rows, cut, base, log_u, alpha)
    if backend_for(cur_lp) == "triton":
        return _kernels().mh_accept_(*args)
    return reference.mh_accept_(*args)
