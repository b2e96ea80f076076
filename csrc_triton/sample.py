"""Fused Gumbel-max sampling + log-prob gather over the vocabulary, in one pass.

Spec: ``powersample_fast.ops.reference.sample_logprobs`` / ``gather_logprobs``. For each row the kernel
streams the logits once, in tiles of ``BLOCK_V``, keeping
  - an online max / sum-of-exp in fp32 at temperature 1 (all tokens)      -> lp normaliser
  - an online max / sum-of-exp in fp32 of z*inv_tau over the kept tokens  -> lq normaliser
  - the running first argmax of z*inv_tau + gumbel(key, i) over the kept tokens (sampling only)
  - the first NaN index, so that a NaN logit is "sampled" exactly like ``torch.argmax`` does.
  - with ``entropy=True``, an online sum of e_i*d_i (d = z - running max, e = exp(d)) beside the
    temperature-1 sum of exp, rescaled with it, giving the entropy h = log s - sum(e d) / s of the
    base conditional (one extra reduction in the same pass; lp/lq are the same bits either way).
The Gumbel noise is the integer hash of ``reference.uniform`` in uint32 arithmetic (multiplication
wraps mod 2**32, shifts are logical), so kernel and reference draw the same token bit for bit.

Skipping the hash: g <= G_MAX (u <= 1 - 2**-24 gives g <= 16.64), and fp32 rounding is monotone, so
a tile whose largest kept z*inv_tau satisfies ``max + G_MAX <= best`` cannot hold a strictly larger
score; its hash and logs are skipped. At low temperature this removes almost all of the hash work.

Split-V: with few rows the launcher cuts every row into ``n_split`` chunks (grid [R, n_split]); each
program writes its partial state and ``_sample_combine_kernel`` merges them (max-rescaled sums,
max score with the lowest index on ties, lowest NaN index) and finishes the row.

On CUDA the Gumbel logs use libdevice's accurate ``log`` (``tl.log`` may lower to an approximate
lg2, whose absolute error near u = 1 would change exactly the large Gumbels that win); the
interpreter has no libdevice and uses numpy's log.

Validation of values (key range, token range) is done only for CPU tensors (no host sync on CUDA);
on CUDA keys are truncated to their low 32 bits and an out-of-range gather token gives lp = lq = NaN.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from powersample_fast.errors import ConfigError

from .checks import INTERPRET as _INTERPRET  # decided when triton.jit decorates the kernels below
from .checks import check_device, check_positive_float, check_shape, check_tensor

LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
G_MAX = tl.constexpr(17.0)  # > max Gumbel -log(-log(1 - 2**-24)) = 16.64
_N_PART_F = 6  # m1, s1, m2, s2, best score, u1 (sum e*d at temperature 1, for the entropy)
_N_PART_I = 2  # best index, first NaN index


def _is_cuda(device: torch.device) -> bool:
    """The launch plan's only question about the device (split-V, libdevice log). A function so that
    benchmarks/compile_sm90.py can plan CUDA launches on meta tensors without a GPU."""
    return device.type == "cuda"


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if not _is_cuda(device):
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block_v(V: int) -> int:
    # 4096 fp32 lanes per tile (16 per thread with 8 warps); the interpreter prefers fewer tiles.
    cap = 16384 if _INTERPRET else 4096
    return min(cap, max(16, triton.next_power_of_2(V)))


def _auto_splits(R: int, V: int, block_v: int, device: torch.device) -> int:
    if not _is_cuda(device):
        return 1
    # enough programs for ~2 waves, but chunks of at least 2 tiles
    return max(1, min(triton.cdiv(2 * _num_sms(device), R), triton.cdiv(V, 2 * block_v)))


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _fmix32(h):
    """murmur3 finaliser on uint32 (wrapping multiply, logical shifts)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _gumbel(offs, key, PRECISE_LOG: tl.constexpr):
    """Gumbel noise fp32 for vocabulary indices ``offs`` (int32) and a uint32 ``key``
    (``reference.gumbel``)."""
    h = _fmix32((offs.to(tl.uint32) * 0x9E3779B9) ^ key)
    h = _fmix32(h + key)
    u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # * 2**-23, exact
    if PRECISE_LOG:
        g = -libdevice.log(-libdevice.log(u))
    else:
        g = -tl.log(-tl.log(u))
    return g


@triton.jit
def _rescale_u(u, s, m_old, m_safe):
    """sum e*d relative to max m_old -> relative to m_safe (>= m_old): e' = e*c, d' = d + (m_old - m_safe),
    c = exp(m_old - m_safe); 0 while nothing was summed (s == 0, m_old may be -inf)."""
    return tl.where(s > 0, tl.exp(m_old - m_safe) * (u + (m_old - m_safe) * s), 0.0)


@triton.jit
def _finish_row(row, tok, m1, s1, m2, s2, u1, row_ptr, thr, inv_tau, V, stride_v,
                tok_ptr, lp_ptr, lq_ptr, h_ptr, HAS_TOPK: tl.constexpr, SAMPLE: tl.constexpr,
                ENTROPY: tl.constexpr):
    """lp = z_tok - lse(z), lq = zt_tok - lse(zt over kept); store (tok,) lp, lq (and the entropy
    h = log s1 - u1 / s1) of ``row``."""
    ok = (tok >= 0) & (tok < V)
    z_tok = tl.load(row_ptr + tok * stride_v, mask=ok, other=float("nan")).to(tl.float32)
    zt_tok = z_tok * inv_tau
    if HAS_TOPK:
        zt_tok = tl.where(z_tok < thr, float("-inf"), zt_tok)
    lp = z_tok - (m1 + tl.log(s1))
    lq = zt_tok - (m2 + tl.log(s2))
    if SAMPLE:
        tl.store(tok_ptr + row, tok)
    tl.store(lp_ptr + row, lp)
    tl.store(lq_ptr + row, lq)
    if ENTROPY:
        tl.store(h_ptr + row, tl.log(s1) - u1 / s1)


@triton.jit
def _sample_kernel(
    logits_ptr, keys_ptr, thr_ptr, tok_in_ptr,      # inputs
    tok_ptr, lp_ptr, lq_ptr, h_ptr,                  # outputs (n_split == 1)
    part_f_ptr, part_i_ptr,                          # partials [R, n_split, 6] f32, [.., 2] i32
    V, chunk, stride_r, stride_v, inv_tau,
    HAS_TOPK: tl.constexpr, SAMPLE: tl.constexpr, SPLIT: tl.constexpr,
    PRECISE_LOG: tl.constexpr, BLOCK_V: tl.constexpr, ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    lo = sp * chunk
    hi = tl.minimum(lo + chunk, V)
    row_ptr = logits_ptr + row * stride_r
    if SAMPLE:
        key = tl.load(keys_ptr + row).to(tl.uint32)
    thr = 0.0
    if HAS_TOPK:
        thr = tl.load(thr_ptr + row)

    m1 = float("-inf")  # running max of z        (temperature 1, all tokens)
    s1 = 0.0            # running sum exp(z - m1)
    u1 = 0.0            # running sum exp(z - m1) * (z - m1)   (entropy only)
    m2 = float("-inf")  # running max of zt = z*inv_tau over kept tokens
    s2 = 0.0
    best = float("-inf")  # running max of zt + g
    best_i = lo           # its first index
    nan_i = V             # first index of a NaN logit (V: none)
    for start in range(lo, hi, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < hi
        z = tl.load(row_ptr + offs.to(tl.int64) * stride_v, mask=mask,
                    other=float("-inf")).to(tl.float32)
        # temperature 1
        m1_new = tl.maximum(m1, tl.max(z, 0))
        m1_safe = tl.where(m1_new == float("-inf"), 0.0, m1_new)
        if ENTROPY:
            d = z - m1_safe
            e = tl.exp(d)
            u1 = _rescale_u(u1, s1, m1, m1_safe) + tl.sum(tl.where(e > 0, e * d, 0.0), 0)
        s1 = s1 * tl.exp(m1 - m1_safe) + tl.sum(tl.exp(z - m1_safe), 0)
        m1 = m1_new
        # proposal (temperature tau, kept set)
        zt = z * inv_tau
        if HAS_TOPK:
            zt = tl.where(z < thr, float("-inf"), zt)
        zt_max = tl.max(zt, 0)
        m2_new = tl.maximum(m2, zt_max)
        m2_safe = tl.where(m2_new == float("-inf"), 0.0, m2_new)
        s2 = s2 * tl.exp(m2 - m2_safe) + tl.sum(tl.exp(zt - m2_safe), 0)
        m2 = m2_new
        if SAMPLE:
            # NaN logits win like in torch.argmax (NaN compares greater than everything).
            nan_i = tl.minimum(nan_i, tl.min(tl.where(z != z, offs, V), 0))
            if zt_max + G_MAX > best:  # else no score of this tile can exceed best
                score = zt + _gumbel(offs, key, PRECISE_LOG)
                score = tl.where(score != score, float("-inf"), score)
                t_best, t_arg = tl.max(score, 0, return_indices=True,
                                       return_indices_tie_break_left=True)
                better = t_best > best  # strict: earlier index wins ties
                best_i = tl.where(better, start + t_arg, best_i)
                best = tl.where(better, t_best, best)

    if SPLIT:
        pf = part_f_ptr + (row * tl.num_programs(1) + sp) * 6
        tl.store(pf + 0, m1)
        tl.store(pf + 1, s1)
        tl.store(pf + 2, m2)
        tl.store(pf + 3, s2)
        tl.store(pf + 4, best)
        tl.store(pf + 5, u1)
        pi = part_i_ptr + (row * tl.num_programs(1) + sp) * 2
        tl.store(pi + 0, best_i)
        tl.store(pi + 1, nan_i)
    else:
        if SAMPLE:
            tok = tl.where(nan_i < V, nan_i, best_i).to(tl.int64)
        else:
            tok = tl.load(tok_in_ptr + row).to(tl.int64)
        _finish_row(row, tok, m1, s1, m2, s2, u1, row_ptr, thr, inv_tau, V, stride_v,
                    tok_ptr, lp_ptr, lq_ptr, h_ptr, HAS_TOPK, SAMPLE, ENTROPY)


@triton.jit
def _sample_combine_kernel(
    logits_ptr, thr_ptr, tok_in_ptr, tok_ptr, lp_ptr, lq_ptr, h_ptr, part_f_ptr, part_i_ptr,
    V, n_split, stride_r, stride_v, inv_tau,
    HAS_TOPK: tl.constexpr, SAMPLE: tl.constexpr, BLOCK_S: tl.constexpr, ENTROPY: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    sm = s < n_split
    pf = part_f_ptr + (row * n_split + s) * 6
    m1 = tl.load(pf + 0, mask=sm, other=float("-inf"))
    s1 = tl.load(pf + 1, mask=sm, other=0.0)
    m2 = tl.load(pf + 2, mask=sm, other=float("-inf"))
    s2 = tl.load(pf + 3, mask=sm, other=0.0)
    M1 = tl.max(m1, 0)
    M1_safe = tl.where(M1 == float("-inf"), 0.0, M1)
    S1 = tl.sum(s1 * tl.exp(m1 - M1_safe), 0)
    U1 = 0.0
    if ENTROPY:
        u1 = tl.load(pf + 5, mask=sm, other=0.0)
        U1 = tl.sum(_rescale_u(u1, s1, m1, M1_safe), 0)
    M2 = tl.max(m2, 0)
    M2_safe = tl.where(M2 == float("-inf"), 0.0, M2)
    S2 = tl.sum(s2 * tl.exp(m2 - M2_safe), 0)
    thr = 0.0
    if HAS_TOPK:
        thr = tl.load(thr_ptr + row)
    if SAMPLE:
        best = tl.load(pf + 4, mask=sm, other=float("-inf"))
        pi = part_i_ptr + (row * n_split + s) * 2
        best_i = tl.load(pi + 0, mask=sm, other=V)
        nan_i = tl.min(tl.load(pi + 1, mask=sm, other=V), 0)
        B = tl.max(best, 0)
        idx = tl.min(tl.where(best == B, best_i, V), 0)  # lowest index among the maxima
        tok = tl.where(nan_i < V, nan_i, idx).to(tl.int64)
    else:
        tok = tl.load(tok_in_ptr + row).to(tl.int64)
    _finish_row(row, tok, M1, S1, M2, S2, U1, logits_ptr + row * stride_r, thr, inv_tau, V,
                stride_v, tok_ptr, lp_ptr, lq_ptr, h_ptr, HAS_TOPK, SAMPLE, ENTROPY)


def _launch(logits, keys, tokens, inv_tau, threshold, sample: bool, num_splits: Optional[int],
            entropy: bool = False):
    R, V = logits.shape
    dev = logits.device
    lp = torch.empty(R, dtype=torch.float32, device=dev)
    lq = torch.empty(R, dtype=torch.float32, device=dev)
    tok = torch.empty(R, dtype=torch.int64, device=dev) if sample else lp
    h = torch.empty(R, dtype=torch.float32, device=dev) if entropy else lp
    if R == 0:
        return tok, lp, lq, h
    block_v = _block_v(V)
    if num_splits is not None and num_splits > 1:  # forced: tiles small enough for the splits
        per_split = triton.cdiv(V, int(num_splits))
        block_v = min(block_v, max(16, 1 << (per_split.bit_length() - 1)))
    n_split = num_splits if num_splits is not None else _auto_splits(R, V, block_v, dev)
    n_split = max(1, min(int(n_split), triton.cdiv(V, block_v)))
    chunk = triton.cdiv(triton.cdiv(V, n_split), block_v) * block_v  # tile-aligned chunks
    n_split = triton.cdiv(V, chunk)
    has_topk = threshold is not None
    dummy = lp
    keys_arg = keys if sample else dummy
    tok_in = tokens if not sample else dummy
    thr = threshold if has_topk else dummy
    if n_split > 1:
        part_f = torch.empty(R, n_split, _N_PART_F, dtype=torch.float32, device=dev)
        part_i = torch.empty(R, n_split, _N_PART_I, dtype=torch.int32, device=dev)
    else:
        part_f, part_i = dummy, dummy
    _sample_kernel[(R, n_split)](
        logits, keys_arg, thr, tok_in, tok, lp, lq, h, part_f, part_i,
        V, chunk, logits.stride(0), logits.stride(1), inv_tau,
        HAS_TOPK=has_topk, SAMPLE=sample, SPLIT=n_split > 1,
        PRECISE_LOG=_is_cuda(dev) and not _INTERPRET, BLOCK_V=block_v, ENTROPY=entropy,
        num_warps=8,
        # no FMA contraction: score = fl(fl(z*inv_tau) + g) exactly as the reference rounds it
        enable_fp_fusion=False,
    )
    if n_split > 1:
        _sample_combine_kernel[(R,)](
            logits, thr, tok_in, tok, lp, lq, h, part_f, part_i,
            V, n_split, logits.stride(0), logits.stride(1), inv_tau,
            HAS_TOPK=has_topk, SAMPLE=sample,
            BLOCK_S=max(16, triton.next_power_of_2(n_split)), num_warps=1, ENTROPY=entropy,
            # _finish_row rounds as in the one-program path (no FMA), whatever Triton's default
            # (fusion on up to Triton 3.9, announced off from 3.10)
            enable_fp_fusion=False,
        )
    return tok, lp, lq, h


def _check_common(logits, inv_tau, threshold):
    check_tensor("logits", logits, ndim=2, dtypes=LOGIT_DTYPES)
    check_device(logits.device, "logits")
    inv_tau = check_positive_float("inv_tau", inv_tau)
    if logits.shape[1] == 0:
        raise ConfigError(f"logits must have a non-empty vocabulary, got shape {tuple(logits.shape)}")
    if logits.shape[1] >= 2**31:
        raise ConfigError(f"logits vocabulary {logits.shape[1]} does not fit int32 indices")
    if threshold is not None:
        check_tensor("threshold", threshold, ndim=1, dtypes=(torch.float32,),
                     device=logits.device, device_of="logits")
        check_shape("threshold", threshold, (logits.shape[0],), "one per row of logits")
        threshold = threshold.contiguous()
    return inv_tau, threshold


def sample_logprobs(logits: torch.Tensor, keys: torch.Tensor, inv_tau: float,
                    threshold: Optional[torch.Tensor] = None, *, num_splits: Optional[int] = None,
                    entropy: bool = False):
    """Fused sample + log-prob gather; see ``reference.sample_logprobs``.

    logits: [R, V] fp32/bf16/fp16 (any strides); keys: [R] int64 holding uint32 values;
    inv_tau > 0; threshold: optional [R] fp32 top-k threshold (tokens with z < threshold are
    excluded from sampling and from the lq normaliser, not from lp's).
    Returns (token [R] int64, lp [R] fp32, lq [R] fp32), and with ``entropy=True`` also the entropy
    h [R] fp32 of softmax(logits) (temperature 1, full vocabulary). ``num_splits`` forces the number
    of programs per row (default: chosen from the GPU size; 1 on CPU)."""
    inv_tau, threshold = _check_common(logits, inv_tau, threshold)
    check_tensor("keys", keys, ndim=1, dtypes=(torch.int64,), device=logits.device,
                 device_of="logits")
    check_shape("keys", keys, (logits.shape[0],), "one per row of logits")
    if keys.device.type == "cpu" and keys.numel() and (keys.min() < 0 or keys.max() >= 2**32):
        raise ConfigError("keys must hold uint32 values in [0, 2**32) (see reference.row_key)")
    tok, lp, lq, h = _launch(logits, keys.contiguous(), None, inv_tau, threshold, True, num_splits,
                             bool(entropy))
    return (tok, lp, lq, h) if entropy else (tok, lp, lq)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor, inv_tau: float,
                    threshold: Optional[torch.Tensor] = None, *, num_splits: Optional[int] = None):
    """Gather-only mode: (lp [R], lq [R]) fp32 of the given tokens [R] (int64/int32); a token
    outside the top-k set gets lq = -inf. See ``reference.gather_logprobs``."""
    inv_tau, threshold = _check_common(logits, inv_tau, threshold)
    check_tensor("tokens", tokens, ndim=1, dtypes=(torch.int64, torch.int32),
                 device=logits.device, device_of="logits")
    check_shape("tokens", tokens, (logits.shape[0],), "one per row of logits")
    V = logits.shape[1]
    if tokens.device.type == "cpu" and tokens.numel() and (tokens.min() < 0 or tokens.max() >= V):
        raise ConfigError(f"tokens must lie in [0, {V}) (the vocabulary of logits)")
    _, lp, lq, _ = _launch(logits, None, tokens.contiguous(), inv_tau, threshold, False, num_splits)
    return lp, lq
