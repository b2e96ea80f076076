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
    zt = z * inv_tau
    if threshold is not None:
        zt = zt.masked_fill(z < threshold[:, None], float("-inf"))
    tok = _gumbel_argmax(zt, keys)
    lp = z.gather(1, tok[:, None])[:, 0] - torch.logsumexp(z, dim=-1)
    lq = zt.gather(1, tok[:, None])[:, 0] - torch.logsumexp(zt, dim=-1)
    return tok, lp, lq


def _gumbel_argmax(zt: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """argmax_i(zt_i + g_i) per row (first index on ties). Exact shortcut for finite rows: the
    noise is computed only for candidates within G_SPAN of the row max (no other token can win, so
    the argmax is the same as over the full row); rows with NaN/+inf take the full path."""
    if zt.device.type != "cpu" or zt.shape[-1] <= 4096:
        return torch.argmax(zt + gumbel(keys, zt.shape[-1]), dim=-1)
    zmax = zt.max(dim=-1, keepdim=True).values
    if not bool(torch.isfinite(zmax).all()) or bool(torch.isnan(zt).any()):
        return torch.argmax(zt + gumbel(keys, zt.shape[-1]), dim=-1)
    rows, cols = torch.nonzero(zt > zmax - G_SPAN, as_tuple=True)
    g = -torch.log(-torch.log(uniform_at(keys.to(torch.int64)[rows], cols)))
    score = torch.full_like(zt, float("-inf"))
    score[rows, cols] = zt[rows, cols] + g
    return torch.argmax(score, dim=-1)


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


