"""The one dispatch point between Triton kernels (``csrc_triton``) and torch references.

Backend rule: Triton for CUDA tensors, the pure-torch reference (``reference.py``; the top-N
log-probs' is ``reference_topn.py``) elsewhere. ``nucleus.py`` (top-p's threshold) is torch on every
backend, like top-k's.
Force either path with the environment variable ``POWERSAMPLE_FAST_BACKEND=triton|torch`` (read at
call time) or with ``set_backend("triton"|"torch"|"auto")``. Forcing "triton" on CPU tensors needs
``TRITON_INTERPRET=1`` set before ``csrc_triton`` is first imported.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from . import nucleus, reference, reference_topn
from ..errors import ConfigError

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


def sample_logprobs(logits, keys, inv_tau, threshold=None, entropy=False):
    """(token, lp, lq), and with entropy=True also h (entropy of softmax(logits)): see reference.py."""
    if backend_for(logits) == "triton":
        return _kernels().sample_logprobs(logits, keys, inv_tau, threshold, entropy=entropy)
    return reference.sample_logprobs(logits, keys, inv_tau, threshold, entropy=entropy)


def gather_logprobs(logits, tokens, inv_tau, threshold=None):
    if backend_for(logits) == "triton":
        return _kernels().gather_logprobs(logits, tokens, inv_tau, threshold)
    return reference.gather_logprobs(logits, tokens, inv_tau, threshold)


def topn_logprobs(logits, rows, tokens, n):
    """Log-probs of `tokens` and the `n` most likely tokens of the selected `rows` of `logits`
    (``reference_topn``; the kernel is ``csrc_triton/topn.py``)."""
    if backend_for(logits) == "triton":
        return _kernels().topn_logprobs(logits, rows, tokens, n)
    return reference_topn.topn_logprobs(logits, rows, tokens, n)


def topp_threshold(logits, inv_tau, top_p, threshold=None):
    """Per-row nucleus threshold (``nucleus.topp_threshold``; torch on every backend, like top-k's)."""
    return nucleus.topp_threshold(logits, inv_tau, top_p, threshold)


def kv_copy_(kv, src, dst, start, length):
    if backend_for(kv) == "triton":
        return _kernels().kv_copy_(kv, src, dst, start, length)
    return reference.kv_copy_(kv, src, dst, start, length)


def mh_accept_(cur_tok, cur_lp, cur_lq, cur_len, prop_tok, prop_lp, prop_lq, prop_len,
               rows, cut, base, log_u, alpha, index_term=None, cur_h=None, prop_h=None):
    args = (cur_tok, cur_lp, cur_lq, cur_len, prop_tok, prop_lp, prop_lq, prop_len,
            rows, cut, base, log_u, alpha)
    kw = dict(index_term=index_term, cur_h=cur_h, prop_h=prop_h)
    if backend_for(cur_lp) == "triton":
        return _kernels().mh_accept_(*args, **kw)
    return reference.mh_accept_(*args, **kw)
