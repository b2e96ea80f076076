"""Linear layers on CPU: oneDNN with pre-packed weights.

torch's fp32 F.linear on CPU is MKL sgemm, which re-packs the whole weight on every call: with a
few rows (decode) it costs ~2x a 1-row call at 2 rows already. oneDNN's matmul on a weight
reordered once (`_reorder_linear_weight`, what torch.compile's CPU backend does) costs nearly the
same at 1..8 rows. `benchmarks/bench_cpu_step.py`, default model, idle 2-core AVX2 machine, one
decode step with 2 threads: 1 row 62 -> 49 ms, 8 rows 114 -> 70 ms; with 1 thread: 1 row 64 -> 72 ms
(the one case it loses), 2 rows 114 -> 77 ms, 8 rows 140 -> 110 ms. The packed copy is kept beside the weight (fp32 weights are held
twice) and made on first use; a weight replaced or changed in place (data_ptr, version) is re-packed.
POWERSAMPLE_FAST_ONEDNN=0 turns it off. fp32 only: a bf16 weight keeps torch's path (measured on
no CPU with native bf16 yet).
"""
from __future__ import annotations

import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

ONEDNN_ENV = "POWERSAMPLE_FAST_ONEDNN"
_PACKED: dict = {}  # id(weight) -> (weakref to weight, (data_ptr, version), packed); dropped with the weight
_PACK_BATCH = 8  # oneDNN's hint for the row count it tunes the packed layout for


def onednn_linear_enabled() -> bool:
    return (os.environ.get(ONEDNN_ENV, "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


_ONEDNN = onednn_linear_enabled()


def set_onednn_linear(enabled: bool) -> None:
    """Use (True, the default where available) or not oneDNN packed weights for fp32 CPU linears."""
    global _ONEDNN
    _ONEDNN = bool(enabled) and onednn_linear_enabled()


def _packed_weight(w: torch.Tensor) -> Optional[torch.Tensor]:
    """The oneDNN-packed copy of the fp32 CPU weight w [N, K] (made or refreshed here), or None."""
    try:
        key = (w.data_ptr(), w._version)
    except RuntimeError:  # an inference-mode tensor has no version counter: leave it to torch
        return None
    hit = _PACKED.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == key:
        return hit[2]
    packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), _PACK_BATCH)
    if hit is None or hit[0]() is not w:
        weakref.finalize(w, _PACKED.pop, id(w), None)
    _PACKED[id(w)] = (weakref.ref(w), key, packed)
    return packed


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias); fp32 on CPU through oneDNN with a packed weight (see the module docstring)."""
    if _ONEDNN and x.device.type == "cpu" and weight.dtype == torch.float32 and x.dtype == torch.float32:
        packed = _packed_weight(weight)
        if packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "")
            return y.view(*x.shape[:-1], y.shape[-1])
    return F.linear(x, weight, bias)
