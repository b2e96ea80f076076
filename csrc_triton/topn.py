"""Top-N log-probs over logits a step already computed (spec: ``powersample_fast.ops.reference_topn``).

One program per selected row streams the row's logits once, in tiles of ``BLOCK_V``, keeping
  - an online max / sum-of-exp in fp32 at temperature 1 (all tokens)  -> lse
  - the N largest logits seen so far and their ids, in registers (N <= 32): per tile, N rounds of
    "take the tile's largest remaining logit (lowest id on ties), replace the buffer's smallest
    (highest id on ties) if strictly larger" (a later tile's equal logit has a higher id and loses).
At the end the buffer is written most likely first (ties: lower id first), every value as
``z - lse`` with the row's one lse, and the given token's own ``z_tok - lse``: when the token is
the row's argmax its own log-prob and the first top value are the same float, bit for bit.

Launched by the engine only for the rows of a step whose request asked for log-probs (and for a
scored prompt's prefill positions); the sampling kernel (``sample.py``) is not touched. NaN
logits are never in the top-N (their own log-prob is NaN).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from powersample_fast.errors import ConfigError

from .checks import INTERPRET as _INTERPRET  # decided when triton.jit decorates the kernel below
from .checks import check_device, check_shape, check_tensor
from .sample import LOGIT_DTYPES

MAX_N = 32


@triton.jit
def _topn_kernel(logits_ptr, rows_ptr, tok_ptr, own_ptr, ids_ptr, vals_ptr,
                 V, stride_r, stride_v,
                 N: tl.constexpr, NP: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + pid).to(tl.int64)
    row_ptr = logits_ptr + row * stride_r
    slots = tl.arange(0, NP)
    # slots >= N hold +inf so that they are never the buffer's smallest
    top_v = tl.where(slots < N, float("-inf"), float("inf"))
    top_i = tl.full([NP], V, tl.int32)
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        z = tl.load(row_ptr + offs.to(tl.int64) * stride_v, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), 0)
        m = m_new
        zc = tl.where(z != z, float("-inf"), z)  # NaN never enters the top-N
        for _ in tl.static_range(N):
            bv, bl = tl.max(zc, 0, return_indices=True, return_indices_tie_break_left=True)
            bi = start + bl
            wv = tl.min(top_v, 0)
            wid = tl.max(tl.where(top_v == wv, top_i, -1), 0)
            wslot = tl.min(tl.where((top_v == wv) & (top_i == wid), slots, NP), 0)
            take = (slots == wslot) & ((tl.zeros([NP], tl.float32) + bv) > wv)  # (a vector: the interpreter's & wants one)
            top_v = tl.where(take, bv, top_v)
            top_i = tl.where(take, bi, top_i)
            zc = tl.where(offs == bi, float("-inf"), zc)
    lse = m + tl.log(s)
    tok = tl.load(tok_ptr + pid).to(tl.int64)
    ok = (tok >= 0) & (tok < V)
    z_tok = tl.load(row_ptr + tok * stride_v, mask=ok, other=float("nan")).to(tl.float32)
    tl.store(own_ptr + pid, z_tok - lse)
    avail = slots < N
    for k in tl.static_range(N):
        bv = tl.max(tl.where(avail, top_v, float("-inf")), 0)
        hit = avail & (top_v == bv)
        bid = tl.min(tl.where(hit, top_i, V + 1), 0)
        bslot = tl.min(tl.where(hit & (top_i == bid), slots, NP), 0)
        tl.store(ids_ptr + pid * N + k, bid.to(tl.int64))
        tl.store(vals_ptr + pid * N + k, bv - lse)
        avail = avail & (slots != bslot)


def _block_v(V: int) -> int:
    cap = 16384 if _INTERPRET else 4096
    return min(cap, max(16, triton.next_power_of_2(V)))


def topn_logprobs(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, n: int):
    """See ``reference_topn.topn_logprobs``: (own [R] fp32, ids [R, n'] int64, vals [R, n'] fp32)
    with n' = min(n, V). logits [B, V] fp32/bf16/fp16 (any strides); rows, tokens: [R] int64."""
    check_tensor("logits", logits, ndim=2, dtypes=LOGIT_DTYPES)
    check_device(logits.device, "logits")
    for name, t in (("rows", rows), ("tokens", tokens)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int64, torch.int32), device=logits.device, device_of="logits")
    check_shape("tokens", tokens, (rows.shape[0],), "one per selected row")
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_N:
        raise ConfigError(f"n must be an integer in 0..{MAX_N} (got {n!r})")
    B, V = logits.shape
    if V == 0 or V >= 2**31 - 1:
        raise ConfigError(f"logits vocabulary {V} must be in [1, 2**31 - 1)")
    if rows.device.type == "cpu" and rows.numel() and (rows.min() < 0 or rows.max() >= B):
        raise ConfigError(f"rows must lie in [0, {B}) (the rows of logits)")
    n = min(n, V)
    R, dev = rows.shape[0], logits.device
    own = torch.empty(R, dtype=torch.float32, device=dev)
    ids = torch.empty(R, n, dtype=torch.int64, device=dev)
    vals = torch.empty(R, n, dtype=torch.float32, device=dev)
    if R == 0:
        return own, ids, vals
    _topn_kernel[(R,)](logits, rows.contiguous(), tokens.contiguous(), own, ids, vals,
                       V, logits.stride(0), logits.stride(1),
                       N=n, NP=max(1, triton.next_power_of_2(max(n, 1))), BLOCK_V=_block_v(V), num_warps=4)
    return own, ids, vals
