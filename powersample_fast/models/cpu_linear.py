"""Linear layers on CPU: oneDNN with pre-packed weights.

torch's fp32 F.linear on CPU is MKL sgemm, which re-packs the whole weight on every call: with a
few rows (decode) it costs ~2x a 1-row call at 2 rows already. oneDNN's matmul on a weight
reordered once (`_reorder_linear_weight`, what torch.compile's CPU backend does) costs nearly the
same at 1..8 rows. `benchmarks/bench_cpu_step.py`, default model, idle 2-core AVX2 machine, one
decode step with 2 threads: 1 row 62 -> 49 ms, 8 rows 114 -> 70 ms; with 1 thread: 1 row 64 -> 72 ms
(the one case it loses), 2 rows 114 -> 77 ms, 8 rows 140 -> 110 ms. The packed copy is kept beside the weight (fp32 weights are held
twice) and made on first use; a weight replaced or changed in place (data_ptr, version) is re-packed.
POWERSAMPLE_FAST_ONEDNN=0 turns it off.

bf16 takes the same path where the CPU has native bf16 matrix instructions (AVX512-BF16 / AMX, as
oneDNN reports them; elsewhere torch's path). torch's bf16 `aten::mm` calls oneDNN too but reorders
the weight on every call: on a Zen 4 EPYC with AVX512-BF16, 1 thread, loaded, the step's 121
linears took 36.4 -> 21.7 ms at 1 row and 53.0 -> 31.9 ms at 8 rows packed, outputs bit-identical
to `F.linear` (same oneDNN kernel, same accumulation order; tests/models/test_cpu_linear.py checks it).

One bf16 row in an engine of one decode row (`one_row_engine`, entered by that engine's runner) is
the exception: oneDNN's packed kernel reads the weights at ~13 GB/s there, a gemv faster (cpu_kernels'
AVX512-BF16 kernel where it loads, else torch's own bf16 gemv: `F.linear` with oneDNN switched off),
so such a `linear` runs that (the 1-row step of the default model, eager, 1 thread: 31.0 -> 24.7 ms
with torch's gemv; at 8 rows the gemv is 3x slower, so only one row). Engines that batch do not:
the packed kernel's per-row outputs do not depend on the number of rows, the gemv's differ from
them in a few last bits on wide weights (the 49152-wide logits weight), so a request that ran alone
for some steps would get other tokens than in a batch. Not bit-identical to the packed kernel: both accumulate the K products in fp32, in
different orders, then round to bf16 once, so an output differs by at most one bf16 ulp (<= 2**-7 of
its magnitude) plus the fp32 summation difference (<= 2 K 2**-24 sum_k |x_k w_k|); through the default model's 30 layers
the logits moved by <= 0.5 (bf16 logits of magnitude ~20: ~2 bf16 ulps). oneDNN's switch is
process-wide (`torch._C._set_mkldnn_enabled`), turned off for the call only (a traced step runs with
it off: engine/cpu_step.py). POWERSAMPLE_FAST_BF16_GEMV=0 keeps one row on the packed kernel.
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from . import cpu_kernels

ONEDNN_ENV = "POWERSAMPLE_FAST_ONEDNN"
_PACKED: dict = {}  # id(weight) -> (weakref to weight, (data_ptr, version), packed); dropped with the weight
_PACK_BATCH = 8  # oneDNN's hint for the row count it tunes the packed layout for


def onednn_linear_enabled() -> bool:
    return (os.environ.get(ONEDNN_ENV, "1") != "0" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_bf16_supported() -> bool:
    """True when oneDNN runs bf16 matmuls natively on this CPU (AVX512-BF16 or AMX-BF16)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check is not None and check())
    except RuntimeError:  # pragma: no cover - build without the op
        return False


def _packed_dtypes(enabled: bool) -> tuple:
    if not (enabled and onednn_linear_enabled()):
        return ()
    return (torch.float32, torch.bfloat16) if onednn_bf16_supported() else (torch.float32,)


_DTYPES = _packed_dtypes(True)  # activation/weight dtypes that take the packed path


def set_onednn_linear(enabled: bool) -> None:
    """Use (True, the default where available) or not oneDNN packed weights for fp32 (and, with
    native bf16, bf16) CPU linears."""
    global _DTYPES
    _DTYPES = _packed_dtypes(bool(enabled))


BF16_GEMV_ENV = "POWERSAMPLE_FAST_BF16_GEMV"
_BF16_GEMV = os.environ.get(BF16_GEMV_ENV, "1") != "0"


_GEMV_KERNEL = True  # one-row bf16 through cpu_kernels' gemv where it loads (else torch's gemv)


def set_bf16_gemv(enabled: bool, kernel: Optional[bool] = None) -> None:
    """Run one-row bf16 linears through a gemv (True, the default) or the packed kernel; `kernel`:
    the gemv is cpu_kernels' AVX512-BF16 kernel where it loads (True, the default) or torch's."""
    global _BF16_GEMV, _GEMV_KERNEL
    _BF16_GEMV = bool(enabled)
    if kernel is not None:
        _GEMV_KERNEL = bool(kernel)


def gemv_kernel_used(dtype, rows: int) -> bool:
    """Whether `linear` on `rows` rows of `dtype` runs cpu_kernels' gemv (building it on first ask)."""
    return _GEMV_KERNEL and takes_gemv(dtype, rows) and cpu_kernels.has_dtype(dtype)


_ONE_ROW = threading.local()  # .on: inside `one_row_engine` (this thread)


@contextlib.contextmanager
def one_row_engine():
    """Inside (the forward calls of an engine whose batch is one decode row): one bf16 row takes the
    gemv. Everywhere else (engines that batch, direct model calls) every row count runs the packed
    kernel, whose per-row outputs do not depend on how many rows run together, so a request's
    tokens do not depend on what else is in the batch. The gemv sums in another order (module
    docstring): a row computed by it alone and by the packed kernel in a batch would differ."""
    prev = getattr(_ONE_ROW, "on", False)
    _ONE_ROW.on = True
    try:
        yield
    finally:
        _ONE_ROW.on = prev


def takes_gemv(dtype, rows: int) -> bool:
    """Whether `linear` on `rows` rows of `dtype` runs a one-row gemv (inside `one_row_engine`): bf16
    where it is packed (cpu_kernels' gemv, else torch's), fp32 where it is packed (torch's F.linear:
    MKL's sgemv, ~23 GB/s against ~15-17 GB/s for the packed kernel at one row)."""
    if not (_BF16_GEMV and rows == 1 and getattr(_ONE_ROW, "on", False)):
        return False
    return dtype in (torch.bfloat16, torch.float32) and dtype in _DTYPES


def linear_mode() -> tuple:
    """What `linear` (and cpu_kernels' fused ops) do now (packed dtypes, one-row bf16 gemv and which,
    fused ops): a traced step records one mode."""
    return _DTYPES, _BF16_GEMV, _GEMV_KERNEL, getattr(_ONE_ROW, "on", False), cpu_kernels.mode()


@contextlib.contextmanager
def onednn_matmul_off():
    """oneDNN off for torch's own matmuls (process-wide flag, restored on exit)."""
    prev = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(prev)


def _packed_weight(w: torch.Tensor) -> Optional[torch.Tensor]:
    """The oneDNN-packed copy of the CPU weight w [N, K] (made or refreshed here), or None."""
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


# While a step is traced (engine/cpu_step.py): id(weight) -> the packed weight as a traced input. A
# packed (opaque oneDNN) tensor cannot be a trace constant, and the tracer cannot record the op's
# empty `Scalar?[]` argument, so traced calls go through a TorchScript function that builds it.
_TRACE_PACKED: Optional[dict] = None
_TRACE_GEMV = False  # set when a traced linear took the one-row bf16 gemv (its replay needs oneDNN off)
_SCRIPTED = None
_SCRIPTED_SRC = """
def packed_linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    s: List[Optional[number]] = []
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", s, "")
"""


@contextlib.contextmanager
def tracing_packed(packed: dict):
    """Inside: `linear` on a weight w with id(w) in `packed` uses packed[id(w)] through a scripted
    call (recordable by torch.jit.trace); other weights use F.linear."""
    global _TRACE_PACKED, _SCRIPTED, _TRACE_GEMV
    if _SCRIPTED is None:
        _SCRIPTED = torch.jit.CompilationUnit(_SCRIPTED_SRC).packed_linear
    _TRACE_PACKED, _TRACE_GEMV = packed, False
    try:
        yield
    finally:
        _TRACE_PACKED = None


def traced_gemv() -> bool:
    """Whether the last `tracing_packed` block recorded a one-row bf16 gemv."""
    return _TRACE_GEMV


ROW_CHUNK = 32  # bf16 decode rows per packed call: up to this many, a row's bits do not depend on the count


def _in_row_chunks(x: torch.Tensor, op) -> torch.Tensor:
    """op over x's rows [M, K]: in one call, or, for more than ROW_CHUNK bf16 decode rows (x [B, 1, K]:
    one position per row), in calls of ROW_CHUNK. oneDNN's packed bf16 kernel gives a row the same
    bits for any row count up to 32 but others from 33 rows on, on wide weights (the 49152-wide logits
    weight; measured on an AMX Xeon), which would make a request's tokens depend on how many rows its
    batch had; fp32 was the same at every count. A prefill ([1, T, K]: one sequence) runs alone on its
    row whatever the batch, so it stays one call."""
    rows = x.reshape(-1, x.shape[-1])
    if x.dtype != torch.bfloat16 or rows.shape[0] <= ROW_CHUNK or x.dim() < 3 or x.shape[-2] != 1:
        return op(rows)
    return torch.cat([op(rows[i:i + ROW_CHUNK]) for i in range(0, rows.shape[0], ROW_CHUNK)])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias); fp32 (and bf16 where native) on CPU through oneDNN with a packed
    weight, one row of a one-row engine through a gemv (see the module docstring)."""
    global _TRACE_GEMV
    if x.device.type == "cpu" and weight.dtype == x.dtype:
        if x.numel() and takes_gemv(x.dtype, x.numel() // max(x.shape[-1], 1)):  # one row of a one-row engine
            if x.dtype == torch.float32:  # MKL's sgemv
                return F.linear(x, weight, bias)
            if (_GEMV_KERNEL and weight.is_contiguous() and (bias is None or bias.dtype == x.dtype)
                    and cpu_kernels.has_dtype(x.dtype)):
                return cpu_kernels.gemv(x, weight, bias)  # an op of its own: traced as itself
            if _TRACE_PACKED is not None:  # torch's bf16 gemv: traced as aten::linear, replayed with oneDNN off
                _TRACE_GEMV = True
                return F.linear(x, weight, bias)
            with onednn_matmul_off():
                return F.linear(x, weight, bias)
        if x.dtype in _DTYPES:
            if _TRACE_PACKED is not None:  # being traced: the same op, on the packed input
                packed = _TRACE_PACKED.get(id(weight))
                if packed is None:
                    return F.linear(x, weight, bias)
                y = _in_row_chunks(x, lambda rows: _SCRIPTED(rows, packed, bias))
                return y.view(*x.shape[:-1], y.shape[-1])
            packed = _packed_weight(weight)
            if packed is not None:
                y = _in_row_chunks(x, lambda rows: torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], ""))
                return y.view(*x.shape[:-1], y.shape[-1])
    return F.linear(x, weight, bias)
