"""The one-row bf16 kernel (models/csrc/gemv_bf16.cpp via models/cpu_gemv.py): against torch's
gemv within the summation-order bound, used by `cpu_linear.linear` for one bf16 row, and off with a
one-line note (torch's gemv instead) where it cannot be built."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from powersample_fast.models import cpu_gemv
from powersample_fast.models import cpu_linear as L

needs_kernel = pytest.mark.skipif(
    not (L.onednn_bf16_supported() and cpu_gemv.cpu_has_avx512_bf16() and cpu_gemv.gemv_kernel_ready()),
    reason=f"the one-row bf16 kernel is off here ({cpu_gemv.gemv_kernel_off_reason() or 'no native bf16'})")


def order_bound(y, yt, x, w, bias):
    """|y - yt| for two sums of the same K bf16 products, each rounded to bf16 once (bias: one more
    rounding on torch's side): one bf16 ulp plus the fp32 summation-order difference."""
    K = x.shape[-1]
    mag = (x.float().abs().reshape(1, K) @ w.float().abs().t()).reshape(y.shape)
    big = torch.maximum(y.float().abs(), yt.float().abs())
    return 2.0 ** -7 * big * (2 if bias else 1) + 2 * K * 2.0 ** -24 * mag


@needs_kernel
@pytest.mark.parametrize("kn", [(576, 960), (1536, 576), (576, 49152), (40, 33), (8, 5), (33, 7), (64, 4)])
@pytest.mark.parametrize("shape", [(1,), (1, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_is_torch_gemv_within_the_summation_order_bound(kn, shape, bias):
    K, N = kn  # K not a multiple of 32 takes the masked tail, N not a multiple of 4 the one-row tail
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(N, K, generator=g) * 0.05).bfloat16()
    b = torch.randn(N, generator=g).bfloat16() if bias else None
    x = torch.randn(*shape, K, generator=g).bfloat16()
    y = cpu_gemv.gemv_bf16(x, w, b)
    with L.onednn_matmul_off():
        yt = F.linear(x, w, b)
    assert y.shape == yt.shape and y.dtype == torch.bfloat16
    assert ((y.float() - yt.float()).abs() <= order_bound(y, yt, x, w, bias)).all()
    exact = (x.double().reshape(1, K) @ w.double().t()).reshape(y.shape) + (b.double() if bias else 0)
    mag = (x.double().abs().reshape(1, K) @ w.double().abs().t()).reshape(y.shape)
    assert ((y.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + K * 2.0 ** -24 * mag + 1e-30).all()


@needs_kernel
def test_wrong_kernel_is_caught_by_the_bound():
    """The bound above is tight enough to see a kernel that drops the K tail (the 32-wide loop only)."""
    K, N = 40, 33
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(N, K, generator=g) * 0.05).bfloat16()
    x = torch.randn(1, K, generator=g).bfloat16()
    wrong = cpu_gemv.gemv_bf16(x[:, :32].contiguous(), w[:, :32].contiguous())
    with L.onednn_matmul_off():
        yt = F.linear(x, w)
    assert not ((wrong.float() - yt.float()).abs() <= order_bound(wrong, yt, x, w, False)).all()


@needs_kernel
def test_one_bf16_row_of_linear_runs_the_kernel_and_more_rows_do_not():
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(96, 64, generator=g) * 0.05).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(3, 64, generator=g).bfloat16()
    assert L.gemv_kernel_used(torch.bfloat16, 1) and not L.gemv_kernel_used(torch.bfloat16, 2)
    assert torch.equal(L.linear(x[:1], w, b), cpu_gemv.gemv_bf16(x[:1], w, b))
    assert torch.equal(L.linear(x, w, b), F.linear(x, w, b))  # packed kernel, bit-identical to F.linear
    L.set_bf16_gemv(True, kernel=False)
    try:
        with L.onednn_matmul_off():
            assert torch.equal(L.linear(x[:1], w, b), F.linear(x[:1], w, b))  # torch's gemv
    finally:
        L.set_bf16_gemv(True, kernel=True)


@needs_kernel
def test_bad_arguments_are_named():
    w = torch.zeros(4, 8, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="one row of 8"):
        cpu_gemv.gemv_bf16(torch.zeros(2, 8, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="bf16 only"):
        cpu_gemv.gemv_bf16(torch.zeros(1, 8), w.float())
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_gemv.gemv_bf16(torch.zeros(1, 4, dtype=torch.bfloat16), w.t())


def _fresh_process(tmp_path, **env):
    code = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from powersample_fast.models import cpu_gemv, cpu_linear as L
        print("READY", cpu_gemv.gemv_kernel_ready(), flush=True)
        x, w = torch.randn(1, 16).bfloat16(), torch.randn(8, 16).bfloat16()
        with L.onednn_matmul_off():
            print("SAME", torch.equal(L.linear(x, w), F.linear(x, w)))
    """)
    full = {**os.environ, "POWERSAMPLE_FAST_HOME": str(tmp_path / "home"), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(not (L.onednn_bf16_supported() and cpu_gemv.cpu_has_avx512_bf16()),
                    reason="the kernel is only tried on CPUs with AVX512-BF16")
@pytest.mark.parametrize("cxx", ["no-such-compiler-xyz", "false"])
def test_a_kernel_that_cannot_be_built_leaves_torchs_gemv_with_one_line(tmp_path, cxx):
    done = _fresh_process(tmp_path, CXX=cxx)
    assert done.returncode == 0, done.stderr
    assert "READY False" in done.stdout and "SAME True" in done.stdout
    notes = [ln for ln in done.stderr.splitlines() if "one-row bf16 kernel off" in ln]
    assert len(notes) == 1 and ("no C++ compiler" in notes[0] if cxx.startswith("no-") else "failed" in notes[0])
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not (L.onednn_bf16_supported() and cpu_gemv.cpu_has_avx512_bf16()),
                    reason="the kernel is only built on CPUs with AVX512-BF16")
def test_kernel_is_built_once_into_the_cache_and_env_turns_it_off(tmp_path):
    if not cpu_gemv.gemv_kernel_ready():
        pytest.skip(f"the kernel does not build here ({cpu_gemv.gemv_kernel_off_reason()})")
    first = _fresh_process(tmp_path)
    assert "READY True" in first.stdout and "building the one-row bf16 kernel" in first.stderr, first.stderr
    assert list((tmp_path / "home" / "ext").glob("*/gemv_bf16.so"))
    again = _fresh_process(tmp_path)
    assert "READY True" in again.stdout and "building" not in again.stderr
    off = _fresh_process(tmp_path, **{cpu_gemv.KERNEL_ENV: "0"})
    assert "READY False" in off.stdout and "SAME True" in off.stdout and off.stderr.strip() == ""
