"""Kernel benchmarks: fused sampler, KV copy, MH accept; torch reference vs Triton (CUDA only).

    python -m pytest benchmarks/bench_kernels.py --benchmark-only \
        --benchmark-columns=median,iqr,min,rounds --benchmark-json=benchmarks/results/kernels.json

``extra_info`` of every case holds the GPU name, the bytes an ideal kernel moves (the same number
for both providers, so GB/s is an effective bandwidth), GB/s at the median, and the roofline
fraction: GB/s divided by the device-to-device copy bandwidth measured in this file (a 1 GiB
``Tensor.copy_``, read + write bytes).
"""
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import csrc_triton  # noqa: E402
from powersample_fast.ops import reference as ref  # noqa: E402

DEVICE = torch.device("cuda")
PROVIDERS = {
    "torch": dict(sample=ref.sample_logprobs, kv=ref.kv_copy_, mh=ref.mh_accept_),
    "triton": dict(sample=csrc_triton.sample_logprobs, kv=csrc_triton.kv_copy_,
                   mh=csrc_triton.mh_accept_),
}


@pytest.fixture(scope="module")
def copy_bandwidth():
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 20 copies of 1 GiB."""
    n = 1 << 28  # fp32 elements: 1 GiB
    a = torch.empty(n, dtype=torch.float32, device=DEVICE).uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    del a, b
    return 2 * n * 4 / times[len(times) // 2]


def _run(benchmark, fn, bytes_moved, copy_bw, **info):
    fn()  # compile / warm up outside the timing
    torch.cuda.synchronize()

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=50, iterations=1, warmup_rounds=5)
    median = benchmark.stats.stats.median
    gbps = bytes_moved / median / 1e9
    benchmark.extra_info.update(
        gpu=torch.cuda.get_device_name(DEVICE), bytes=int(bytes_moved), gb_per_s=round(gbps, 1),
        copy_gb_per_s=round(copy_bw / 1e9, 1), roofline_fraction=round(gbps * 1e9 / copy_bw, 3),
        **info)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("rows", [64, 1])
@pytest.mark.parametrize("top_k", [None, 50])
def test_sample_logprobs(benchmark, copy_bandwidth, provider, rows, top_k):
    V, inv_tau = 151936, 4.0
    g = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(rows, V, device=DEVICE, generator=g) * 3).to(torch.bfloat16)
    keys = ref.row_key(torch.zeros(rows, dtype=torch.int64, device=DEVICE),
                       torch.arange(rows, device=DEVICE))
    thr = ref.topk_threshold(logits, top_k)  # computed once, outside the timing
    op = PROVIDERS[provider]["sample"]
    _run(benchmark, lambda: op(logits, keys, inv_tau, thr), logits.numel() * 2, copy_bandwidth,
         shape=[rows, V], dtype="bf16", top_k=top_k)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_kv_copy(benchmark, copy_bandwidth, provider):
    # Qwen2.5-7B-like cache: 28 layers, 4 kv heads, head_dim 128, 64 rows of 2048 positions;
    # 32 forks of ragged prefixes (mean ~1024 positions)
    L, N, H, S, D = 28, 64, 4, 2048, 128
    kv = torch.zeros(L, 2, N, H, S, D, dtype=torch.bfloat16, device=DEVICE)
    g = torch.Generator().manual_seed(0)
    src = torch.arange(32)
    dst = torch.arange(32, 64)
    length = torch.randint(1, S, (32,), generator=g)
    start = torch.zeros(32, dtype=torch.int64)
    n_pos = int(length.sum())
    src, dst, start, length = (t.to(DEVICE) for t in (src, dst, start, length))
    op = PROVIDERS[provider]["kv"]
    bytes_moved = 2 * n_pos * L * 2 * H * D * 2  # read + write
    _run(benchmark, lambda: op(kv, src, dst, start, length), bytes_moved, copy_bandwidth,
         shape=[L, 2, N, H, S, D], positions=n_pos)


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_mh_accept(benchmark, copy_bandwidth, provider):
    S, T, n = 64, 4096, 64
    g = torch.Generator().manual_seed(0)
    cur_len = torch.randint(T // 2, T + 1, (S,), generator=g)
    prop_len = torch.randint(T // 2, T + 1, (S,), generator=g)
    # the commit sets cur_len = prop_len in place, so start equal: every timed call then does the
    # same work and bytes_moved stays true after the first call
    cur_len = prop_len.clone()
    cut = (torch.rand(S, generator=g) * cur_len).long()
    bufs = [torch.randint(0, 1000, (S, T)), -torch.rand(S, T), -torch.rand(S, T), cur_len,
            torch.randint(0, 1000, (S, T)), -torch.rand(S, T), -torch.rand(S, T), prop_len]
    bufs = [b.to(DEVICE) for b in bufs]
    rows = torch.arange(n, device=DEVICE)
    base = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    # log u = -inf: every row accepted, so every call does the full commit (the same each time)
    log_u = torch.full((n,), float("-inf"), device=DEVICE)
    suf_cur = int((cur_len - cut).clamp(min=0).sum())
    suf_prop = int((prop_len - cut).clamp(min=0).sum())
    # sums: lp+lq of both (4 B each); commit: read prop tok/lp/lq, write cur (16 B + 16 B)
    bytes_moved = 8 * suf_cur + 8 * suf_prop + 32 * suf_prop
    cut = cut.to(DEVICE)
    op = PROVIDERS[provider]["mh"]
    _run(benchmark, lambda: op(*bufs, rows, cut, base, log_u, 4.0), bytes_moved, copy_bandwidth,
         shape=[S, T], rows=n)
