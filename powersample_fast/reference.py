"""Pure-torch reference implementations ("specs") of every Triton kernel.

Each function here is the ground truth its kernel in ``csrc_triton`` is tested against, and the
implementation used on CPU tensors (see ``ops.py``). All randomness is an *input* (a per-row 32-bit
key), so a kernel and its reference can be compared bit for bit.

Random stream
-------------
Every row of a sampling call gets a key ``key = row_key(seed, counter)`` (uint32 stored in int64),
from the chain's 32-bit seed and the chain's draw counter. The uniform for vocabulary index ``i`` is
``uniform(key, i)`` below (murmur3 fmix32 hashing, pure integer math, reproducible in Triton):

    h = fmix32(((i * 0x9E3779B9) mod 2**32) ^ key)
    h = fmix32((h + key) mod 2**32)
    u = ((h >> 9) + 0.5) * 2**-23            # in (0, 1), exact in fp32 (24 significant bits)

and the Gumbel noise is ``g = -log(-log(u))`` in fp32. A token is drawn by Gumbel-max:
``argmax_i(z_i / tau + g_i)`` over the kept set (first index on ties).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
FMIX_C1 = 0x85EBCA6B
FMIX_C2 = 0xC2B2AE35


def _mul32(a: torch.Tensor, b: int) -> torch.Tensor:
    """(a * b) mod 2**32 for int64 ``a`` in [0, 2**32) and python int ``b`` < 2**32, without
    int64 overflow (split ``b`` in 16-bit halves)."""
    lo, hi = b & 0xFFFF, b >> 16
    return (a * lo + (((a * hi) & 0xFFFF) << 16)) & M32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3 32-bit finaliser on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    h = h ^ (h >> 16)
    return h


def row_key(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Per-row uint32 key (int64 tensor) from a per-chain seed and a per-chain draw counter.

    This is computed in torch on every backend (it is O(rows)); kernels receive its result."""
    seed = seed.to(torch.int64) & M32
    counter = counter.to(torch.int64)
    h = fmix32(seed ^ _mul32(counter & M32, GOLDEN))
    h = fmix32(h ^ ((counter >> 32) & M32) ^ 0x5BD1E995)
    return h


def row_key_int(seed: int, counter: int) -> int:
    """``row_key`` for python ints (the sampler computes its keys on the host: no device ops)."""
    def fmix(h):
        h ^= h >> 16
        h = (h * FMIX_C1) & M32
        h ^= h >> 13
        h = (h * FMIX_C2) & M32
        return h ^ (h >> 16)

    seed &= M32
    h = fmix(seed ^ ((counter & M32) * GOLDEN & M32))
    return fmix(h ^ ((counter >> 32) & M32) ^ 0x5BD1E995)


def uniform_at(key: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """uniform(key, i) elementwise for broadcastable int64 ``key`` and vocabulary indices ``idx``."""
    k = key.to(torch.int64)
    h = fmix32(_mul32(idx.to(torch.int64), GOLDEN) ^ k)
    h = fmix32((h + k) & M32)
    # 23 bits + 0.5 needs 24 significant bits, so the sum is exact in fp32 and u <= 1 - 2**-24.
    # (With h >> 8 the sum rounded 2**24 - 0.5 up to 2**24: u == 1.0 and a +inf Gumbel.)
    return ((h >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def uniform(key: torch.Tensor, n: int) -> torch.Tensor:
    """uniforms [R, n] (fp32, in (0,1)) for int64 keys [R] at vocabulary indices 0..n-1."""
    idx = torch.arange(n, dtype=torch.int64, device=key.device)
    return uniform_at(key[:, None], idx[None, :])


def gumbel(key: torch.Tensor, n: int) -> torch.Tensor:
    """Gumbel noise [R, n] fp32: -log(-log(u))."""
    return -torch.log(-torch.log(uniform(key, n)))


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
):
    """Fused sample + log-prob gather (spec of ``csrc_triton.sample.sample_logprobs``).

    logits: [R, V] (fp32/bf16/fp16); keys: [R] int64 (uint32 values); inv_tau = 1/tau > 0;
    threshold: optional [R] fp32 top-k threshold (see ``topk_threshold``).
    Returns (token [R] int64, lp [R] fp32, lq [R] fp32):
      token = argmax over kept i of (z_i*inv_tau + g_i)
      lp = z_tok - logsumexp(z)                       (base model, temperature 1, full vocab)
      lq = z_tok*inv_tau - logsumexp(z*inv_tau over kept)   (proposal)
    Non-finite logits propagate to non-finite lp/lq (callers check)."""
    z = logits.float()  # [R, V]
    same = inv_tau == 1.0 and threshold is None  # the proposal is the base model: lq = lp
    zt = z if same else z * inv_tau
    if threshold is not None:
        zt = zt.masked_fill(z < threshold[:, None], float("-inf"))
    zmax, amax = zt.max(dim=-1, keepdim=True)  # [R, 1]: one pass for the argmax shortcut and logsumexp
    tok = _gumbel_argmax(zt, keys, zmax, amax)
    lse = _logsumexp(z)
    lp = z.gather(1, tok[:, None])[:, 0] - lse
    if same:
        return tok, lp, lp.clone()
    lq = zt.gather(1, tok[:, None])[:, 0] - _logsumexp(zt, zmax)
    return tok, lp, lq


def _logsumexp(x: torch.Tensor, xmax: Optional[torch.Tensor] = None) -> torch.Tensor:
    """logsumexp over the last dim of fp32 [R, V] -> [R], in torch.logsumexp's order (max, exp of
    the shifted row, sum, log, + max; an infinite max is replaced by 0), with the terms below
    exp(EXP_MIN) set to 0 instead of evaluated (see EXP_MIN). xmax: x's row max [R, 1], if known."""
    m = x.amax(dim=-1, keepdim=True) if xmax is None else xmax
    m = m.masked_fill(m.abs() == float("inf"), 0.0)
    e = (x - m).clamp_min_(EXP_MIN).exp_()  # [R, V]; clamped terms are exp(EXP_MIN)
    # zero every term <= 2 exp(EXP_MIN) (the clamped ones and a few just above); NaN and inf stay
    torch.nn.functional.threshold_(e, _EXP_DROP, 0.0)
    return e.sum(dim=-1).log_().add_(m[:, 0])


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
    idx = torch.log((t[:, 0] - base).to(torch.float32)) - torch.log((t2[:, 0] - base).to(torch.float32))
    log_a = alpha * (s_prop_lp - s_cur_lp) + (s_cur_lq - s_prop_lq) + idx
    acc = log_u < log_a
    sel = acc[:, None] & in_prop  # [n, T]
    r = rows
    cur_tok[r] = torch.where(sel, prop_tok[r], cur_tok[r])
    cur_lp[r] = torch.where(sel, prop_lp[r], cur_lp[r])
    cur_lq[r] = torch.where(sel, prop_lq[r], cur_lq[r])
    cur_len[r] = torch.where(acc, prop_len[r], cur_len[r])
    return acc, log_a


def log_uniform(key: torch.Tensor) -> torch.Tensor:
    """log(u) fp32 [R] for the MH test, u = uniform(key, 1)."""
    return torch.log(uniform(key, 1)[:, 0])


