"""Batched Metropolis-Hastings test with in-place commit (ALGORITHM.md steps 2c/2d), one launch.

Spec: ``powersample_fast.ops.reference.mh_accept_``. One program per entry i of ``rows``:
  r = rows[i], m = cut[i], t = cur_len[r], t' = prop_len[r]
  log_A = alpha*(sum_{m<=p<t'} prop_lp - sum_{m<=p<t} cur_lp)
          + (sum_{m<=p<t} cur_lq - sum_{m<=p<t'} prop_lq) + log(t - base) - log(t' - base)
  accept = log_u < log_A; if accepted, prop_*[r, m:t'] -> cur_*[r, m:t'] and cur_len[r] = t'.
Optional (issue 22): ``index_term`` [n] fp32 replaces log(t - base) - log(t' - base) (the entropy
cut's log W(x) - log W(x'), computed by the caller); ``cur_h``/``prop_h`` [S, T] fp32 (per-token
entropies) are committed with tok/lp/lq.
Sums accumulate in fp32 (in a different order than torch's sum: log_A agrees to fp32 rounding).
Positions are clipped to [0, T) like the reference's masks. Rows must be distinct.

For CPU tensors ``rows`` is range-checked; on CUDA (no host sync) an entry whose row lies outside
[0, S) is not committed and gets accepted = False, log_A = NaN.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from powersample_fast.errors import ConfigError

from .checks import check_device, check_positive_float, check_shape, check_tensor


@triton.jit
def _mh_accept_kernel(
    cur_tok_ptr, cur_lp_ptr, cur_lq_ptr, cur_len_ptr,
    prop_tok_ptr, prop_lp_ptr, prop_lq_ptr, prop_len_ptr,
    rows_ptr, cut_ptr, base_ptr, log_u_ptr, acc_ptr, log_a_ptr,
    idx_ptr, cur_h_ptr, prop_h_ptr,
    S, T, alpha,
    s_ct0, s_ct1, s_clp0, s_clp1, s_clq0, s_clq1, s_cl,
    s_pt0, s_pt1, s_plp0, s_plp1, s_plq0, s_plq1, s_pl,
    s_ch0, s_ch1, s_ph0, s_ph1,
    BLOCK_T: tl.constexpr, HAS_IDX: tl.constexpr, HAS_H: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    r = tl.load(rows_ptr + i)
    ok = (r >= 0) & (r < S)
    r = tl.where(ok, r, 0).to(tl.int64)
    m = tl.load(cut_ptr + i).to(tl.int64)
    b = tl.load(base_ptr + i).to(tl.int64)
    log_u = tl.load(log_u_ptr + i)
    t = tl.load(cur_len_ptr + r * s_cl, mask=ok, other=0)
    t2 = tl.load(prop_len_ptr + r * s_pl, mask=ok, other=0)
    lo = tl.minimum(tl.maximum(m, 0), T).to(tl.int32)
    hi = tl.maximum(tl.minimum(tl.maximum(t, t2), T), lo).to(tl.int32)
    t_c = tl.minimum(t, T).to(tl.int32)     # clipped ends (no int32 overflow for huge lengths)
    t2_c = tl.minimum(t2, T).to(tl.int32)

    acc_clp = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_clq = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_plp = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc_plq = tl.zeros([BLOCK_T], dtype=tl.float32)
    for p0 in range(lo, hi, BLOCK_T):
        p = p0 + tl.arange(0, BLOCK_T)
        pp = p.to(tl.int64)
        in_cur = p < t_c     # (t = t' = 0 for an invalid row)
        in_prop = p < t2_c
        acc_clp += tl.load(cur_lp_ptr + r * s_clp0 + pp * s_clp1, mask=in_cur, other=0.0)
        acc_clq += tl.load(cur_lq_ptr + r * s_clq0 + pp * s_clq1, mask=in_cur, other=0.0)
        acc_plp += tl.load(prop_lp_ptr + r * s_plp0 + pp * s_plp1, mask=in_prop, other=0.0)
        acc_plq += tl.load(prop_lq_ptr + r * s_plq0 + pp * s_plq1, mask=in_prop, other=0.0)
    s_clp = tl.sum(acc_clp, 0)
    s_clq = tl.sum(acc_clq, 0)
    s_plp = tl.sum(acc_plp, 0)
    s_plq = tl.sum(acc_plq, 0)
    if HAS_IDX:
        idx = tl.load(idx_ptr + i)
    else:
        idx = tl.log((t - b).to(tl.float32)) - tl.log((t2 - b).to(tl.float32))
    log_a = alpha * (s_plp - s_clp) + (s_clq - s_plq) + idx
    log_a = tl.where(ok, log_a, float("nan"))
    accept = (log_u < log_a) & ok
    if accept:
        for p0 in range(lo, t2_c, BLOCK_T):
            p = p0 + tl.arange(0, BLOCK_T)
            pp = p.to(tl.int64)
            pm = p < t2_c
            tok = tl.load(prop_tok_ptr + r * s_pt0 + pp * s_pt1, mask=pm)
            tl.store(cur_tok_ptr + r * s_ct0 + pp * s_ct1, tok, mask=pm)
            lp = tl.load(prop_lp_ptr + r * s_plp0 + pp * s_plp1, mask=pm)
            tl.store(cur_lp_ptr + r * s_clp0 + pp * s_clp1, lp, mask=pm)
            lq = tl.load(prop_lq_ptr + r * s_plq0 + pp * s_plq1, mask=pm)
            tl.store(cur_lq_ptr + r * s_clq0 + pp * s_clq1, lq, mask=pm)
            if HAS_H:
                h = tl.load(prop_h_ptr + r * s_ph0 + pp * s_ph1, mask=pm)
                tl.store(cur_h_ptr + r * s_ch0 + pp * s_ch1, h, mask=pm)
        tl.store(cur_len_ptr + r * s_cl, t2)
    tl.store(acc_ptr + i, accept)
    tl.store(log_a_ptr + i, log_a)


def mh_accept_(cur_tok, cur_lp, cur_lq, cur_len, prop_tok, prop_lp, prop_lq, prop_len,
               rows, cut, base, log_u, alpha: float, *, index_term=None, cur_h=None, prop_h=None):
    """See ``reference.mh_accept_``. cur_tok/prop_tok: [S, T] int64; cur_lp/cur_lq/prop_lp/
    prop_lq: [S, T] fp32; cur_len/prop_len: [S] int64; rows/cut/base: [n] int64; log_u: [n] fp32;
    optional index_term [n] fp32 (replaces the index term), cur_h/prop_h [S, T] fp32 (committed).
    The [S, T] buffers and cur_len are updated in place (any strides). Returns
    (accepted [n] bool, log_A [n] fp32)."""
    check_tensor("cur_lp", cur_lp, ndim=2, dtypes=(torch.float32,))
    dev = cur_lp.device
    check_device(dev, "cur_lp")
    S, T = cur_lp.shape
    i64, f32 = (torch.int64,), (torch.float32,)
    for name, t, dt in (("cur_tok", cur_tok, i64), ("cur_lq", cur_lq, f32),
                        ("prop_tok", prop_tok, i64), ("prop_lp", prop_lp, f32),
                        ("prop_lq", prop_lq, f32)):
        check_tensor(name, t, ndim=2, dtypes=dt, device=dev, device_of="cur_lp")
        check_shape(name, t, (S, T), "[chains, max_new_tokens] like cur_lp")
    for name, t in (("cur_len", cur_len), ("prop_len", prop_len)):
        check_tensor(name, t, ndim=1, dtypes=i64, device=dev, device_of="cur_lp")
        check_shape(name, t, (S,), "one per chain row of cur_lp")
    check_tensor("rows", rows, ndim=1, dtypes=i64, device=dev, device_of="cur_lp")
    n = rows.shape[0]
    for name, t, dt in (("cut", cut, i64), ("base", base, i64), ("log_u", log_u, f32)):
        check_tensor(name, t, ndim=1, dtypes=dt, device=dev, device_of="cur_lp")
        check_shape(name, t, (n,), "one per entry of rows")
    alpha = check_positive_float("alpha", alpha)
    if index_term is not None:
        check_tensor("index_term", index_term, ndim=1, dtypes=f32, device=dev, device_of="cur_lp")
        check_shape("index_term", index_term, (n,), "one per entry of rows")
        index_term = index_term.contiguous()
    if (cur_h is None) != (prop_h is None):
        raise ConfigError("give both cur_h and prop_h (per-token entropies), or neither")
    if cur_h is not None:
        for name, t in (("cur_h", cur_h), ("prop_h", prop_h)):
            check_tensor(name, t, ndim=2, dtypes=f32, device=dev, device_of="cur_lp")
            check_shape(name, t, (S, T), "[chains, max_new_tokens] like cur_lp")
    if dev.type == "cpu" and n and (rows.min() < 0 or rows.max() >= S):
        raise ConfigError(f"rows holds chain rows outside [0, {S}) (cur_lp has {S} rows)")
    accepted = torch.empty(n, dtype=torch.bool, device=dev)
    log_a = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return accepted, log_a
    block_t = min(1024, max(16, triton.next_power_of_2(T)))
    _mh_accept_kernel[(n,)](
        cur_tok, cur_lp, cur_lq, cur_len, prop_tok, prop_lp, prop_lq, prop_len,
        rows.contiguous(), cut.contiguous(), base.contiguous(), log_u.contiguous(),
        accepted, log_a,
        index_term if index_term is not None else log_a,
        cur_h if cur_h is not None else cur_lp, prop_h if prop_h is not None else prop_lp,
        S, T, alpha,
        cur_tok.stride(0), cur_tok.stride(1), cur_lp.stride(0), cur_lp.stride(1),
        cur_lq.stride(0), cur_lq.stride(1), cur_len.stride(0),
        prop_tok.stride(0), prop_tok.stride(1), prop_lp.stride(0), prop_lp.stride(1),
        prop_lq.stride(0), prop_lq.stride(1), prop_len.stride(0),
        *(cur_h.stride() + prop_h.stride() if cur_h is not None else (0, 0, 0, 0)),
        BLOCK_T=block_t, HAS_IDX=index_term is not None, HAS_H=cur_h is not None, num_warps=4,
        # log_A = alpha*(...) + (...) rounded as the reference does (no FMA), whatever Triton's
        # default (fusion on up to Triton 3.9, announced off from 3.10)
        enable_fp_fusion=False,
    )
    return accepted, log_a
