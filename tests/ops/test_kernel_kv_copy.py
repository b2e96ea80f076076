"""csrc_triton.kv_copy_ (one-launch ragged KV fork / copy) against reference.kv_copy_."""
import pytest
import torch

import csrc_triton
from powersample_fast.ops import reference as ref
from powersample_fast.errors import ConfigError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CPU = DEVICE.type == "cpu"


def _kv(L, N, H, S, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, 2, N, H, S, D, generator=g).to(dtype).to(DEVICE)


def _run_both(kv, src, dst, start, length):
    a, b = kv.clone(), kv.clone()
    out = csrc_triton.kv_copy_(a, *(t.to(DEVICE) for t in (src, dst, start, length)))
    ref.kv_copy_(b, *(t.to(DEVICE).to(torch.int64) for t in (src, dst, start, length)))
    assert out is None
    assert torch.equal(a, b)
    return a


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_random_ragged_triples(dtype):
    # 3 layers, 8 rows, 2 kv heads, seq 97, head_dim 80 (a padded BLOCK_D)
    L, N, H, S, D = 3, 8, 2, 97, 80
    kv = _kv(L, N, H, S, D, dtype)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(N, generator=g)
    src, dst = perm[:4], perm[4:]
    start = torch.tensor([0, 13, 50, 96])
    length = torch.tensor([0, 40, 47, 1])  # includes an empty range and the last position
    a = _run_both(kv, src, dst, start, length)
    assert not torch.equal(a, kv)  # something was copied


def test_fork_prefix_and_clipping():
    L, N, H, S, D = 2, 5, 3, 37, 16
    kv = _kv(L, N, H, S, D, torch.float32, seed=2)
    src = torch.tensor([0, 0, 1])
    dst = torch.tensor([2, 3, 4])
    start = torch.tensor([0, 30, -5])   # fork at m = 20; range past S; negative start
    length = torch.tensor([20, 100, 9])
    _run_both(kv, src, dst, start, length)
    _run_both(kv, src.to(torch.int32), dst.to(torch.int32), start.to(torch.int32),
              length.to(torch.int32))


def test_long_sequence_uses_several_chunks():
    # CHUNK_S = 8 tiles of 4096 // 16 = 256 positions: ranges straddle chunks at 2048 and 4096
    L, N, H, S, D = 1, 4, 1, 4100, 16
    kv = _kv(L, N, H, S, D, torch.bfloat16, seed=3)
    _run_both(kv, torch.tensor([0, 1]), torch.tensor([2, 3]),
              torch.tensor([0, 2040]), torch.tensor([2040, 2060]))


def test_non_contiguous_cache():
    # positions-major layout [L, 2, N, S, H, D] seen as [L, 2, N, H, S, D], and a prefix view
    L, N, H, S, D = 2, 4, 3, 21, 8
    g = torch.Generator().manual_seed(4)
    base = torch.randn(L, 2, N, S, H, D, generator=g).to(DEVICE)
    kv = base.transpose(3, 4)
    assert not kv.is_contiguous()
    a, b = kv.clone(), kv.clone()  # clone keeps the strides
    assert a.stride() == kv.stride()
    args = [torch.tensor(v, device=DEVICE) for v in ([0, 1], [2, 3], [3, 0], [10, 21])]
    csrc_triton.kv_copy_(a, *args)
    ref.kv_copy_(b, *args)
    assert torch.equal(a, b)
    big = _kv(L, N, H, S + 5, D, torch.float16, seed=5)
    view = big[:, :, :, :, :S]
    before = big.clone()
    csrc_triton.kv_copy_(view, *args)
    ref.kv_copy_(before[:, :, :, :, :S], *args)
    assert torch.equal(big, before)  # positions >= S untouched


def test_no_triples_is_a_no_op():
    kv = _kv(1, 2, 1, 5, 4, torch.float32)
    e = torch.empty(0, dtype=torch.int64, device=DEVICE)
    _run_both(kv, e, e, e, e)


@pytest.mark.parametrize("case,match", [
    ("kv_5d", "kv must be 6-D"),
    ("kv_int", "kv must have a floating dtype"),
    ("kv_not_kv", r"kv must be \[n_layers, 2,"),
    ("src_float", "src must have dtype"),
    ("dst_shape", r"dst must have shape \(2,\) like src"),
    ("length_2d", "length must be 1-D"),
    ("start_device", "start is on meta"),
])
def test_rejects_bad_inputs(case, match):
    kv = _kv(1, 4, 1, 6, 4, torch.float32)
    src, dst, start, length = (torch.tensor(v, device=DEVICE) for v in ([0, 1], [2, 3], [0, 0], [3, 6]))
    if case == "kv_5d":
        kv = kv[0]
    elif case == "kv_int":
        kv = kv.to(torch.int32)
    elif case == "kv_not_kv":
        kv = torch.cat([kv, kv], dim=1)
    elif case == "src_float":
        src = src.float()
    elif case == "dst_shape":
        dst = dst[:1]
    elif case == "length_2d":
        length = length[None]
    elif case == "start_device":
        start = torch.empty(2, dtype=torch.int64, device="meta")
    with pytest.raises(ConfigError, match=match):
        csrc_triton.kv_copy_(kv, src, dst, start, length)


@pytest.mark.skipif(not ON_CPU, reason="value checks run only for CPU tensors (no host sync on CUDA)")
def test_rows_out_of_range_on_cpu():
    kv = _kv(1, 4, 1, 6, 4, torch.float32)
    z = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ConfigError, match=r"dst holds rows outside \[0, 4\)"):
        csrc_triton.kv_copy_(kv, z, torch.tensor([4]), z, z + 1)
    with pytest.raises(ConfigError, match=r"src holds rows outside \[0, 4\)"):
        csrc_triton.kv_copy_(kv, torch.tensor([-1]), z + 1, z, z + 1)
