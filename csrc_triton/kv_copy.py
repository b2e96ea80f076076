"""In-place copy of KV-cache position ranges between rows, all layers / K / V in one launch.

Spec: ``powersample_fast.ops.reference.kv_copy_``. Grid: [n * L * 2 * H, cdiv(S, CHUNK_S)]; program
(j, l, c, h, chunk) copies positions [start_j, start_j + length_j) intersected with its chunk of
[0, S) from row src_j to row dst_j, in [BLOCK_S, BLOCK_D] tiles. The grid depends only on shapes
(never on the lengths), so there is no host sync; programs whose chunk misses the range do nothing.

Preconditions (as in the reference): rows in ``dst`` distinct and not in ``src``. For CPU tensors
the row indices are range-checked; on CUDA a triple whose src or dst lies outside [0, N) is skipped,
and ranges are clipped to [0, S) (like the reference's mask).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from powersample_fast.errors import ConfigError

from .checks import check_device, check_tensor

_INDEX_DTYPES = (torch.int64, torch.int32)


@triton.jit
def _kv_copy_kernel(
    kv_ptr, src_ptr, dst_ptr, start_ptr, len_ptr,
    N, L2, H, S, D, CHUNK_S,
    s_l, s_c, s_n, s_h, s_s, s_d,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # = (j * L2 + l * 2 + c) * H + h
    per_triple = L2 * H
    j = pid // per_triple
    rest = pid % per_triple
    lc = rest // H
    h = rest % H
    ch = tl.program_id(1)
    src = tl.load(src_ptr + j).to(tl.int64)
    dst = tl.load(dst_ptr + j).to(tl.int64)
    st = tl.load(start_ptr + j).to(tl.int64)
    ln = tl.load(len_ptr + j).to(tl.int64)
    ok = (src >= 0) & (src < N) & (dst >= 0) & (dst < N)
    c_lo = ch.to(tl.int64) * CHUNK_S
    lo = tl.minimum(tl.maximum(tl.maximum(st, c_lo), 0), S)           # in [0, S]
    hi = tl.maximum(tl.minimum(tl.minimum(st + ln, c_lo + CHUNK_S), S), lo)  # in [lo, S]
    hi = tl.where(ok, hi, lo)
    lo32 = lo.to(tl.int32)
    hi32 = hi.to(tl.int32)
    base = (lc // 2) * s_l + (lc % 2) * s_c + h * s_h
    src_base = kv_ptr + base + src * s_n
    dst_base = kv_ptr + base + dst * s_n
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    d_off = d.to(tl.int64)[None, :] * s_d
    for s0 in range(lo32, hi32, BLOCK_S):
        p = s0 + tl.arange(0, BLOCK_S)
        m = (p < hi32)[:, None] & dm[None, :]
        off = p.to(tl.int64)[:, None] * s_s + d_off
        x = tl.load(src_base + off, mask=m)
        tl.store(dst_base + off, x, mask=m)


def kv_copy_(kv: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, start: torch.Tensor,
             length: torch.Tensor) -> None:
    """kv[:, :, dst[j], :, start[j]:start[j]+length[j]] = kv[:, :, src[j], :, same] for every j,
    in place, one launch. kv: [L, 2, N, H, S, D] any float dtype, any strides;
    src/dst/start/length: [n] int64/int32."""
    check_tensor("kv", kv, ndim=6)
    if not kv.dtype.is_floating_point:
        raise ConfigError(f"kv must have a floating dtype, got {kv.dtype} (shape {tuple(kv.shape)})")
    check_device(kv.device, "kv")
    for name, t in (("src", src), ("dst", dst), ("start", start), ("length", length)):
        check_tensor(name, t, ndim=1, dtypes=_INDEX_DTYPES, device=kv.device, device_of="kv")
    n = src.shape[0]
    for name, t in (("dst", dst), ("start", start), ("length", length)):
        if t.shape[0] != n:
            raise ConfigError(f"{name} must have shape ({n},) like src, got {tuple(t.shape)}")
    L, two, N, H, S, D = kv.shape
    if two != 2:
        raise ConfigError(f"kv must be [n_layers, 2, n_rows, n_kv_heads, max_len, head_dim], "
                          f"got shape {tuple(kv.shape)}")
    if kv.device.type == "cpu" and n:
        for name, t in (("src", src), ("dst", dst)):
            if t.min() < 0 or t.max() >= N:
                raise ConfigError(f"{name} holds rows outside [0, {N}) (kv has {N} rows)")
    if n == 0 or kv.numel() == 0:
        return None
    block_d = triton.next_power_of_2(D)
    block_s = max(1, min(triton.next_power_of_2(S), 4096 // block_d))  # ~4096 elements a tile
    chunk_s = max(block_s * 8, triton.cdiv(S, 65535))
    grid = (n * L * 2 * H, triton.cdiv(S, chunk_s))
    _kv_copy_kernel[grid](
        kv, src.contiguous(), dst.contiguous(), start.contiguous(), length.contiguous(),
        N, 2 * L, H, S, D, chunk_s,
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), kv.stride(4), kv.stride(5),
        BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4,
        # no float arithmetic here: explicit only so that no kernel of csrc_triton depends on
        # Triton's default (fusion on up to 3.9, which warns about it, announced off from 3.10)
        enable_fp_fusion=False,
    )
    return None
