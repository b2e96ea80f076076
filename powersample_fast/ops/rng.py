"""The random stream every sampling kernel and its torch reference share: counter-based, pure
integer math (murmur3 fmix32), so the Triton kernel and ``reference.py`` draw bit-identical noise.

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


def log_uniform(key: torch.Tensor) -> torch.Tensor:
    """log(u) fp32 [R] for the MH test, u = uniform(key, 1)."""
    return torch.log(uniform(key, 1)[:, 0])
