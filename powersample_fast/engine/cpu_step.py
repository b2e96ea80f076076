"""Decode steps replayed from TorchScript traces on CPU: the CPU counterpart of `cuda_graphs.py`.

A 1-row decode step of a small model is bound by per-op host cost as much as by its matmuls: ~15 ops
per layer, each a Python call through nn.Module, the dispatcher and a small kernel. `TracedDecode`
records `Transformer.cached_core` for one batch size with `torch.jit.trace` and replays the recorded
ops from C++ (the graph executor with its optimisations off: no fusion, no re-specialisation), so
the step runs **the same aten ops in the same order** as the eager step and its logits and K/V
writes are bit-identical (tests/engine/test_cpu_step.py checks them against eager steps).

What is traced and what is not: the KV length is not baked in (it reaches the trace as the length
of a dummy 1-d tensor, so every length replays the same graph), the batch size is (one trace per
number of decode rows, made lazily after that size's first `TRACE_AFTER` eager steps: start-up and
short calls never pay for a trace; ~0.3-0.5 s per size for the default model). The oneDNN-packed
weights of `cpu_linear` are inputs of the trace (an opaque tensor cannot be a constant), refreshed
every call, so a re-packed weight is used at once; if `cpu_linear`'s mode changes the traces are
dropped. A trace whose linears took the one-row bf16 gemv (cpu_linear) replays with oneDNN's matmul
switch off, as the eager call sets it around each such linear (the switch changes nothing else in a
step: the tests compare the two bit for bit). Any failure while tracing or replaying turns the traces off for this runner (the eager step
then recomputes the step: its K/V writes are the same values). POWERSAMPLE_FAST_CPU_TRACE=0 turns
them off. Measured (bench_cpu_step.py, AMD EPYC Zen 4, 1 thread, default model, in
benchmarks/results/cpu-decode.md): bf16 1 row 34 -> 27 ms, fp32 52 -> 44 ms per forward.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..models import cpu_linear

TRACE_ENV = "POWERSAMPLE_FAST_CPU_TRACE"
TRACE_AFTER = 16  # eager steps of a batch size before it is traced


def cpu_trace_enabled() -> bool:
    return os.environ.get(TRACE_ENV, "1") != "0" and hasattr(torch.jit, "trace")


def _linear_weights(model) -> List[torch.Tensor]:
    """Every weight `cpu_linear.linear` is called on in a step (the Linear layers and the logits')."""
    ws = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    if model.output is None:  # tied: the logits read the embedding
        ws.append(model.tok_embeddings.weight)
    return ws


class TracedDecode:
    """Replays decode steps of `model` over `cache` rows 0..B-1 from one trace per B."""

    def __init__(self, model, cache, trace_after: Optional[int] = None):
        self.model, self.cache = model, cache
        self.trace_after = TRACE_AFTER if trace_after is None else trace_after
        self.weights = _linear_weights(model)
        self.seen: Dict[int, int] = {}  # B -> eager steps taken
        self.traces: Dict[int, Tuple[Callable, tuple, bool]] = {}  # B -> (trace, which weights are packed
        # inputs, whether it replays with oneDNN off: a one-row bf16 gemv, cpu_linear)
        self.failed: Optional[str] = None  # why tracing is off, once it failed
        self._packing = cpu_linear.linear_mode()
        self._kvl = torch.empty(cache.max_len + 1, dtype=torch.int8)  # [:kv_len] carries kv_len

    def _packed(self, B: int) -> list:
        """The packed weights a B-row step reads, in `self.weights` order (None: not packed)."""
        if self.model.dtype not in self._packing[0] or cpu_linear.takes_gemv(self.model.dtype, B):
            return [None] * len(self.weights)
        return [cpu_linear._packed_weight(w) for w in self.weights]

    def step(self, tok: torch.Tensor, pos: torch.Tensor, B: int, kv_len: int) -> Optional[torch.Tensor]:
        """Logits [B, V] of the decode step (tok, pos: [B, 1] int64; rows 0..B-1 attend over kv_len
        positions), replayed from B's trace; None when the caller must run the eager step (B not
        traced yet, or tracing off)."""
        if self.failed is not None:
            return None
        if cpu_linear.linear_mode() != self._packing:  # packing switched: the traces hold the old path
            self.traces.clear()
            self._packing = cpu_linear.linear_mode()
        hit = self.traces.get(B)
        if hit is None:
            n = self.seen.get(B, 0) + 1
            self.seen[B] = n
            if n <= self.trace_after:
                return None
        try:
            packed = self._packed(B)
            mask = tuple(p is not None for p in packed)
            if hit is None:
                fn = self._trace(tok, pos, B, kv_len, packed)
                hit = self.traces[B] = (fn, mask, cpu_linear.traced_gemv())
            elif hit[1] != mask:  # a weight stopped (or started) being packed: trace again later
                del self.traces[B]
                self.seen[B] = 0
                return None
            args = [p for p in packed if p is not None]
            with torch.jit.optimized_execution(False), (cpu_linear.onednn_matmul_off() if hit[2]
                                                        else contextlib.nullcontext()):
                return hit[0](tok, pos, self.cache.kv, self._kvl[:kv_len], *args)
        except Exception as e:  # noqa: BLE001 - any failure: the eager step (exact) from now on
            self.failed = f"{type(e).__name__}: {e}"
            self.traces.clear()
            warnings.warn(f"CPU decode-step traces turned off, eager steps from now on ({self.failed})",
                          RuntimeWarning, stacklevel=2)
            return None

    def _trace(self, tok, pos, B: int, kv_len: int, packed: list) -> Callable:
        """Trace the step for B rows (running it once: its K/V writes are the step's own values)."""
        model, cache = self.model, self.cache
        ids = [id(w) for w, p in zip(self.weights, packed) if p is not None]

        def f(tok, pos, kv, kvl, *pk):  # kv is cache.kv: an input, so its writes are recorded on it
            with cpu_linear.tracing_packed(dict(zip(ids, pk))):
                return model.cached_core(tok, pos, cache, slice(0, B), kvl.shape[0], None)[:, 0]

        args = [p for p in packed if p is not None]
        with warnings.catch_warnings():  # the tracer's notes on model constants (head_dim) and its deprecation
            warnings.simplefilter("ignore")
            return torch.jit.trace(f, (tok, pos, cache.kv, self._kvl[:kv_len], *args), check_trace=False)
