"""Pure-torch reference implementations ("specs") of every Triton kernel.

Each function here is the ground truth its kernel in ``csrc_triton`` is tested against, and the
implementation used on CPU tensors (see ``ops/__init__.py``). All randomness is an *input* (a
per-row 32-bit key), so a kernel and its reference can be compared bit for bit; the random stream
(keys, uniforms, Gumbel noise) is ``rng.py``, re-exported here as the spec of the kernels' noise.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .rng import gumbel, row_key, row_key_int, uniform, uniform_at  # noqa: F401  (re-exported)


# Range of the Gumbel noise: u in [2**-24, 1 - 2**-24] gives g in [-2.81, 16.64]. A token whose
# z*inv_tau is more than G_SPAN below the row's largest kept z*inv_tau can never win the Gumbel-max.
G_SPAN = 20.0
G_MAX = 17.0  # > the largest Gumbel, 16.64 (the Triton kernel's bound)
# exp(d) for fp32 d < EXP_MIN is subnormal or 0 (< 2**-125). torch's vectorised exp evaluates such
# inputs on a slow path (measured ~20x per element on AVX2; at temperature 1/4 most of a real row is
# there), so `_logsumexp` drops those terms: each is < 2**-125 of the row's largest term (1), all of
# them together < 2**-107 of the sum, far below the fp32 rounding of the sum (2**-24).
EXP_MIN = -87.0
_EXP_DROP = 2.0 * math.exp(EXP_MIN)  # 3.3e-38 < 2**-124


def topk_threshold(logits: torch.Tensor, top_k: Optional[int]) -> Optional[torch.Tensor]:
    """Per-row k-th largest logit (fp32) [R], or None when top_k is None or >= V.
    Tokens with logit >= threshold are kept (ties at the threshold are all kept)."""
    if top_k is None or top_k >= logits.shape[-1]:
        return None
    return torch.topk(logits.float(), top_k, dim=-1).values[:, -1].contiguous()


def sample_logprobs(
    logits: torch.Tensor,
    keys: torch.Tensor,
    inv_tau: float,
    threshold: Optional[torch.Tensor] = None,
    entropy: bool = False,
):
    """Fused sample + log-prob gather (spec of ``csrc_triton.sample.sample_logprobs``).

    logits: [R, V] (fp32/bf16/fp16); keys: [R] int64 (uint32 values); inv_tau = 1/tau > 0;
    threshold: optional [R] fp32 top-k threshold (see ``topk_threshold``).
    Returns (token [R] int64, lp [R] fp32, lq [R] fp32), and with ``entropy=True`` also h [R] fp32:
      token = argmax over kept i of (z_i*inv_tau + g_i)
      lp = z_tok - logsumexp(z)                       (base model, temperature 1, full vocab)
      lq = z_tok*inv_tau - logsumexp(z*inv_tau over kept)   (proposal)
      h = -sum_i p_i log p_i, p = softmax(z)          (entropy of the base conditional, temperature 1,
          full vocab: h = log s - sum_i e_i d_i / s with d = z - max z, e = exp(d), s = sum e;
          both terms are >= 0, so no cancellation for near-deterministic rows)
    lp (and lq) are the same bits with or without ``entropy``. Non-finite logits propagate to
    non-finite lp/lq/h (callers check)."""
    z = logits.float()  # [R, V]
    same = inv_tau == 1.0 and threshold is None  # the proposal is the base model: lq = lp
    zt = z if same else z * inv_tau
    if threshold is not None:
        zt = zt.masked_fill(z < threshold[:, None], float("-inf"))
    zmax, amax = zt.max(dim=-1, keepdim=True)  # [R, 1]: one pass for the argmax shortcut and logsumexp
    tok = _gumbel_argmax(zt, keys, zmax, amax)
    if entropy:
        lse, h = _logsumexp(z, with_entropy=True)
    else:
        lse = _logsumexp(z)
    lp = z.gather(1, tok[:, None])[:, 0] - lse
    if same:
        lq = lp.clone()
    else:
        lq = zt.gather(1, tok[:, None])[:, 0] - _logsumexp(zt, zmax)
    return (tok, lp, lq, h) if entropy else (tok, lp, lq)


def _logsumexp(x: torch.Tensor, xmax: Optional[torch.Tensor] = None, with_entropy: bool = False):
    """logsumexp over the last dim of fp32 [R, V] -> [R], in torch.logsumexp's order (max, exp of
    the shifted row, sum, log, + max; an infinite max is replaced by 0), with the terms below
    exp(EXP_MIN) set to 0 instead of evaluated (see EXP_MIN). xmax: x's row max [R, 1], if known.
    with_entropy: also the entropy of softmax(x), (lse [R], h [R]), from the same exponentials
    (h = log s - sum(e * d) / s; the dropped terms contribute 0, as to s)."""
    m = x.amax(dim=-1, keepdim=True) if xmax is None else xmax
    m = m.masked_fill(m.abs() == float("inf"), 0.0)
    d = (x - m).clamp_min_(EXP_MIN)
    e = d.exp() if with_entropy else d.exp_()  # [R, V]; clamped terms are exp(EXP_MIN)
    # zero every term <= 2 exp(EXP_MIN) (the clamped ones and a few just above); NaN and inf stay
    torch.nn.functional.threshold_(e, _EXP_DROP, 0.0)
    s = e.sum(dim=-1)
    lse = s.log().add_(m[:, 0])
    if not with_entropy:
        return lse
    return lse, s.log() - (e * d).sum(dim=-1) / s


def _gumbel_argmax(zt: torch.Tensor, keys: torch.Tensor, zmax: Optional[torch.Tensor] = None,
                   amax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """argmax_i(zt_i + g_i) per row (first index on ties). zmax/amax: the rows' max of zt and its
    index [R, 1], if known. Exact shortcut for finite rows, on CPU: the best score is at least
    LB = zt_max + g(argmax of zt) and a score is at most zt_i + G_MAX, so only candidates with
    zt_i + G_MAX > LB can win; the noise is computed for them alone and the argmax taken over them
    (no other token can reach LB). Rows with NaN or +inf (their max is not finite) take the full path."""
    R, V = zt.shape
    if zt.device.type != "cpu" or V <= 4096:
        return torch.argmax(zt + gumbel(keys, V), dim=-1)
    if zmax is None:
        zmax, amax = zt.max(dim=-1, keepdim=True)
    # max propagates NaN, so this also catches NaN rows; |zt| < 2**20 keeps fp32's rounding of the
    # bound (<= 2**-4) far inside the margin G_MAX - 16.64
    if not bool((zmax.abs() < 2.0 ** 20).all()):
        return torch.argmax(zt + gumbel(keys, V), dim=-1)
    keys = keys.to(torch.int64)
    lb = zmax[:, 0] + -torch.log(-torch.log(uniform_at(keys, amax[:, 0])))  # [R], a score that exists
    rows, cols = torch.nonzero(zt > (lb - G_MAX)[:, None], as_tuple=True)  # candidates, row-major
    score = zt[rows, cols] + -torch.log(-torch.log(uniform_at(keys[rows], cols)))
    best = torch.full((R,), float("-inf"), device=zt.device).scatter_reduce_(0, rows, score, "amax")
    win = score == best[rows]
    return torch.full((R,), V, device=zt.device).scatter_reduce_(0, rows[win], cols[win], "amin")


def gather_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    inv_tau: float,
    threshold: Optional[torch.Tensor] = None,
):
    """Gather-only mode: (lp [R], lq [R]) fp32 of given tokens [R] (scoring). A token outside the
    top-k set gets lq = -inf."""
    z = logits.float()
    zt = z * inv_tau
    if threshold is not None:
        zt = zt.masked_fill(z < threshold[:, None], float("-inf"))
    t = tokens.to(torch.int64)[:, None]
    lp = z.gather(1, t)[:, 0] - torch.logsumexp(z, dim=-1)
    lq = zt.gather(1, t)[:, 0] - torch.logsumexp(zt, dim=-1)
    return lp, lq


def kv_copy_(
    kv: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    start: torch.Tensor,
    length: torch.Tensor,
) -> None:
    """Copy KV positions in place (spec of ``csrc_triton.kv_copy.kv_copy_``).

    kv: [n_layers, 2, n_rows, n_kv_heads, max_len, head_dim] (K and V of every layer).
    src, dst, start, length: [n] int64. For each j:
        kv[:, :, dst[j], :, start[j]:start[j]+length[j]] = kv[:, :, src[j], :, same range]
    Fork at m = (start 0, length m). Rows in dst must be distinct and not in src."""
    S = kv.shape[4]
    # one sliced copy per triple (reads the lengths on the host: fine for the CPU / fallback path;
    # a masked whole-row torch.where was ~1000x slower on long caches)
    for s, d, a, n in zip(src.tolist(), dst.tolist(), start.tolist(), length.tolist()):
        lo, hi = max(a, 0), min(a + n, S)  # ranges clipped to [0, S)
        if hi > lo:
            kv[:, :, d, :, lo:hi] = kv[:, :, s, :, lo:hi]


def mh_accept_(
    cur_tok: torch.Tensor,
    cur_lp: torch.Tensor,
    cur_lq: torch.Tensor,
    cur_len: torch.Tensor,
    prop_tok: torch.Tensor,
    prop_lp: torch.Tensor,
    prop_lq: torch.Tensor,
    prop_len: torch.Tensor,
    rows: torch.Tensor,
    cut: torch.Tensor,
    base: torch.Tensor,
    log_u: torch.Tensor,
    alpha: float,
    *,
    index_term: Optional[torch.Tensor] = None,
    cur_h: Optional[torch.Tensor] = None,
    prop_h: Optional[torch.Tensor] = None,
):
    """Batched Metropolis-Hastings acceptance with in-place commit (spec of
    ``csrc_triton.mh_accept.mh_accept_``), exactly ALGORITHM.md step 2c/2d.

    cur_tok/prop_tok: [S, T] int64; cur_lp/cur_lq/prop_lp/prop_lq: [S, T] fp32;
    cur_len/prop_len: [S] int64 (generated lengths t and t').
    rows, cut, base: [n] int64 (chain row, cut index m, index-term offset: 0 for "uniform",
    (k-1)*B for "last_block"); log_u: [n] fp32.
      log_A = alpha*(sum_{m<=i<t'} prop_lp - sum_{m<=i<t} cur_lp)
              + (sum_{m<=i<t} cur_lq - sum_{m<=i<t'} prop_lq)
              + log(t - base) - log(t' - base)
      accept = log_u < log_A
    For accepted rows, positions m..t'-1 of prop_* are copied into cur_* and cur_len = t'.
    index_term: optional [n] fp32 used instead of log(t - base) - log(t' - base) (the entropy cut:
    log W(x) - log W(x'), ALGORITHM.md "Entropy-guided cut"); cur_h/prop_h: optional [S, T] fp32
    per-token entropies, committed like lp/lq.
    Returns (accepted [n] bool, log_A [n] fp32). Sums accumulate in fp32."""
    T = cur_lp.shape[1]
    pos = torch.arange(T, device=cur_lp.device)[None, :]
    t = cur_len[rows][:, None]
    t2 = prop_len[rows][:, None]
    m = cut[:, None]
    in_cur = (pos >= m) & (pos < t)
    in_prop = (pos >= m) & (pos < t2)
    zero = torch.zeros((), dtype=torch.float32, device=cur_lp.device)
    s_cur_lp = torch.where(in_cur, cur_lp[rows], zero).sum(1)
    s_cur_lq = torch.where(in_cur, cur_lq[rows], zero).sum(1)
    s_prop_lp = torch.where(in_prop, prop_lp[rows], zero).sum(1)
    s_prop_lq = torch.where(in_prop, prop_lq[rows], zero).sum(1)
    if index_term is not None:
        idx = index_term
    else:
        idx = torch.log((t[:, 0] - base).to(torch.float32)) - torch.log((t2[:, 0] - base).to(torch.float32))
    log_a = alpha * (s_prop_lp - s_cur_lp) + (s_cur_lq - s_prop_lq) + idx
    acc = log_u < log_a
    sel = acc[:, None] & in_prop  # [n, T]
    r = rows
    cur_tok[r] = torch.where(sel, prop_tok[r], cur_tok[r])
    cur_lp[r] = torch.where(sel, prop_lp[r], cur_lp[r])
    cur_lq[r] = torch.where(sel, prop_lq[r], cur_lq[r])
    if cur_h is not None:
        cur_h[r] = torch.where(sel, prop_h[r], cur_h[r])
    cur_len[r] = torch.where(acc, prop_len[r], cur_len[r])
    return acc, log_a
