"""The CPU kernels (models/csrc/, built by models/cpu_kernels.py): the one-row gemv against torch's
within the summation-order bound, used by `cpu_linear.linear` for one row of a one-row engine; the
fused RMSNorm / RoPE / SiLU-mul / decode attention against torch's ops, in bf16 and fp32, each with a
wrong variant the same check rejects; bf16 batch invariance; built once into the cache, and off with
one line (torch's ops instead) where they cannot be built."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from powersample_fast.models import cpu_kernels
from powersample_fast.models import cpu_linear as L

needs_kernel = pytest.mark.skipif(
    not (L.onednn_bf16_supported() and cpu_kernels.has_dtype(torch.bfloat16)),
    reason=f"the one-row bf16 kernel is off here ({cpu_kernels.kernels_off_reason() or 'no native bf16'})")


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
    y = cpu_kernels.gemv(x, w, b)
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
    wrong = cpu_kernels.gemv(x[:, :32].contiguous(), w[:, :32].contiguous())
    with L.onednn_matmul_off():
        yt = F.linear(x, w)
    assert not ((wrong.float() - yt.float()).abs() <= order_bound(wrong, yt, x, w, False)).all()


@needs_kernel
def test_one_bf16_row_runs_the_kernel_only_in_a_one_row_engine():
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(96, 64, generator=g) * 0.05).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(3, 64, generator=g).bfloat16()
    assert not L.gemv_kernel_used(torch.bfloat16, 1)  # outside a one-row engine: the packed kernel
    assert torch.equal(L.linear(x[:1], w, b), F.linear(x[:1], w, b))
    with L.one_row_engine():
        assert L.gemv_kernel_used(torch.bfloat16, 1) and not L.gemv_kernel_used(torch.bfloat16, 2)
        assert torch.equal(L.linear(x[:1], w, b), cpu_kernels.gemv(x[:1], w, b))
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
        cpu_kernels.gemv(torch.zeros(2, 8, dtype=torch.bfloat16), w)
    with pytest.raises(RuntimeError, match="bf16 only"):
        torch.ops.powersample_fast.gemv_bf16(torch.zeros(1, 8), w.float(), None)
    with pytest.raises(RuntimeError, match="fp32 CPU tensors only"):
        torch.ops.powersample_fast.rms_norm_f32(torch.zeros(1, 8, dtype=torch.bfloat16), w[0], 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_kernels.gemv(torch.zeros(1, 4, dtype=torch.bfloat16), w.t())


def _fresh_process(tmp_path, **env):
    code = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from powersample_fast.models import cpu_kernels, cpu_linear as L
        cpu_kernels.prepare_in_background("cpu", torch.bfloat16)  # as the loader does: a thread decides
        cpu_kernels.prepare_in_background("cpu", torch.bfloat16)  # once only
        print("READY", cpu_kernels.kernels_ready(), flush=True)  # waits for that thread
        x, w = torch.randn(1, 16).bfloat16(), torch.randn(8, 16).bfloat16()
        with L.onednn_matmul_off():
            print("SAME", torch.equal(L.linear(x, w), F.linear(x, w)))
    """)
    full = {**os.environ, "POWERSAMPLE_FAST_HOME": str(tmp_path / "home"), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_kernels.cpu_dtypes(), reason="the kernels are only tried on CPUs with AVX512-BF16 or AVX2+FMA")
@pytest.mark.parametrize("cxx", ["no-such-compiler-xyz", "false"])
def test_a_kernel_that_cannot_be_built_leaves_torchs_gemv_with_one_line(tmp_path, cxx):
    done = _fresh_process(tmp_path, CXX=cxx)
    assert done.returncode == 0, done.stderr
    assert "READY False" in done.stdout and "SAME True" in done.stdout
    notes = [ln for ln in done.stderr.splitlines() if "CPU kernels off" in ln]
    assert len(notes) == 1 and ("no C++ compiler" in notes[0] if cxx.startswith("no-") else "failed" in notes[0])
    assert "Traceback" not in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not cpu_kernels.cpu_dtypes(), reason="the kernels are only built on CPUs with AVX512-BF16 or AVX2+FMA")
def test_kernel_is_built_once_into_the_cache_and_env_turns_it_off(tmp_path):
    if not cpu_kernels.kernels_ready():
        pytest.skip(f"the kernels do not build here ({cpu_kernels.kernels_off_reason()})")
    first = _fresh_process(tmp_path)
    assert "READY True" in first.stdout and first.stderr.count("building the CPU kernels") == 1, first.stderr
    assert list((tmp_path / "home" / "ext").glob("*/powersample_cpu.so"))
    again = _fresh_process(tmp_path)
    assert "READY True" in again.stdout and "building" not in again.stderr
    lib = next((tmp_path / "home" / "ext").glob("*/powersample_cpu.so"))
    lib.write_bytes(b"not a library")  # a damaged cache entry: built again, once
    mended = _fresh_process(tmp_path)
    assert "READY True" in mended.stdout and mended.stderr.count("building the CPU kernels") == 1, mended.stderr
    assert not list(lib.parent.glob("build-*"))  # no build folder left behind
    off = _fresh_process(tmp_path, **{cpu_kernels.KERNEL_ENV: "0"})
    assert "READY False" in off.stdout and "SAME True" in off.stdout and off.stderr.strip() == ""


# ---------------------------------------------------------------------------------------------
# The fused element-wise ops (csrc/fused_bf16.cpp)
# ---------------------------------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("B,T,H,Hk,D,R", [(1, 1, 9, 3, 64, 64), (2, 3, 4, 2, 16, 8), (3, 1, 2, 2, 32, 32)])
def test_fused_rope_is_apply_rope_bit_for_bit(B, T, H, Hk, D, R):
    from powersample_fast.models.layers import apply_rope

    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(B, T, (H + 2 * Hk) * D + 5, generator=g).bfloat16()[..., :-5]  # not contiguous rows
    cos = torch.randn(B, 1, T, R, generator=g).bfloat16()
    sin = torch.randn(B, 1, T, R, generator=g).bfloat16()
    expect = apply_rope(qkv[..., :(H + Hk) * D].view(B, T, H + Hk, D).transpose(1, 2), cos, sin, R)
    got = cpu_kernels.rope(qkv, cos, sin, H + Hk, D, R)
    assert got.shape == (B, H + Hk, T, D) and torch.equal(got, expect)
    assert not torch.equal(cpu_kernels.rope(qkv, cos, -sin, H + Hk, D, R), expect)  # a sign slip shows


def _one_rounding_bound(ref):
    """Two results that round the same fp32 value chain to bf16 at one more or one fewer place: one
    bf16 ulp of the larger (2**-7 relative) plus a denormal-sized floor."""
    return 2.0 ** -7 * ref.float().abs() + 1e-30


@needs_kernel
def test_fused_silu_mul_and_rms_norm_are_torchs_within_one_rounding():
    from powersample_fast.models.layers import RMSNorm

    g = torch.Generator().manual_seed(9)
    gu = (torch.randn(4, 1, 2 * 1536, generator=g) * 4).bfloat16()
    gate, up = gu.chunk(2, dim=-1)
    expect = F.silu(gate) * up
    got = cpu_kernels.silu_mul(gu)
    assert got.shape == expect.shape
    assert ((got.float() - expect.float()).abs() <= 2 * _one_rounding_bound(expect)).all()
    assert (got == expect).float().mean() > 0.99  # nearly always the same bits
    wrong = cpu_kernels.silu_mul(torch.cat((up, gate), dim=-1))  # halves swapped: caught
    assert not ((wrong.float() - expect.float()).abs() <= 2 * _one_rounding_bound(expect)).all()

    norm = RMSNorm(576, 1e-5).bfloat16()
    norm.weight.data = torch.randn(576, generator=g).bfloat16()
    x = (torch.randn(5, 1, 576, generator=g) * 3).bfloat16()
    cpu_kernels.set_fused_ops(False)
    try:
        expect = norm(x)
    finally:
        cpu_kernels.set_fused_ops(True)
    got = norm(x)
    assert ((got.float() - expect.float()).abs() <= 2 * _one_rounding_bound(expect)).all()
    assert (got == expect).float().mean() > 0.99
    wrong = cpu_kernels.rms_norm(x, norm.weight, 1.0)  # eps 1 instead of 1e-5: caught
    assert not ((wrong.float() - expect.float()).abs() <= 2 * _one_rounding_bound(expect)).all()


@needs_kernel
@pytest.mark.parametrize("B,Hk,M,D,L", [(1, 3, 3, 64, 100), (3, 2, 4, 32, 37), (2, 1, 1, 128, 5)])
def test_fused_decode_attention_is_the_exact_value_rounded_once(B, Hk, M, D, L):
    """attn_decode_bf16 = bf16(exact SDPA) (fp32 inside, one rounding); torch's SDPA kernel rounds its
    probabilities to bf16 first, so the two differ by a few bf16 ulps at most."""
    g = torch.Generator().manual_seed(10)
    q = torch.randn(B, Hk, M, D, generator=g).bfloat16()
    kv = torch.randn(2, B + 1, Hk, L + 7, D, generator=g).bfloat16()
    k, v = kv[0, 1:, :, :L], kv[1, 1:, :, :L]  # strided views of a cache, as the layers pass them
    visible = torch.rand(B, 1, M, L, generator=g) < 0.7
    visible[..., 0] = True
    mask = torch.zeros(B, 1, M, L).bfloat16().masked_fill_(~visible, float("-inf"))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    got = cpu_kernels.attn_decode(q, k, v, mask)
    assert got.shape == (B, Hk, M, D)
    assert ((got.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + 1e-6).all()
    torch_sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert ((got.float() - torch_sdpa.float()).abs() <= 4 * _one_rounding_bound(torch_sdpa) + 2e-3).all()
    unmasked = cpu_kernels.attn_decode(q, k, v, torch.zeros_like(mask))  # the mask ignored: caught
    assert not ((unmasked.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + 1e-6).all()


@needs_kernel
def test_fused_model_logits_move_less_than_bf16_itself(tmp_path):
    """A random Llama (GQA, head_dim 32) decoding 8 steps from a 5-token prompt in bf16: with the
    fused ops its logits differ from torch's ops by less than bf16 logits differ from fp32 ones."""
    import powersample_fast as pf
    from helpers.tiny_models import random_llama
    from powersample_fast.engine.kv_cache import KVCache

    hf = random_llama(seed=3, weight_std=0.1, vocab_size=96, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf.save_pretrained(tmp_path / "m")

    def decode(dtype, fused, path=None):  # path: the tokens to feed (else greedy)
        model = pf.load(tmp_path / "m", device="cpu", dtype=dtype)[0]
        cpu_kernels.set_fused_ops(fused)
        try:
            cache = KVCache(model.config, 1, 32, dtype=model.dtype)
            out = [model.forward_cached(torch.tensor([[5, 17, 3, 60, 8]]), cache, last_only=True)[:, -1]]
            for i in range(8):
                tok = out[-1].argmax(-1, keepdim=True) if path is None else path[i:i + 1, None]
                out.append(model.forward_cached(tok, cache)[:, -1])
            return torch.cat(out).float()
        finally:
            cpu_kernels.set_fused_ops(True)

    fp32 = decode("float32", True)
    path = fp32.argmax(-1)  # the same tokens for every run
    plain16, fused16 = decode("bfloat16", False, path), decode("bfloat16", True, path)
    assert (fused16 - plain16).abs().max() <= (plain16 - fp32).abs().max()
    assert (fused16 - fp32).abs().max() <= 1.5 * (plain16 - fp32).abs().max()


# ---------------------------------------------------------------------------------------------
# Batch invariance: a request's outputs in bf16 do not depend on what else is in the batch
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    import powersample_fast as pf
    from helpers.tiny_models import random_llama

    d = tmp_path_factory.mktemp("bf16_llama")
    random_llama(seed=4, weight_std=0.05, vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128).save_pretrained(d)
    return pf.load(d, device="cpu", dtype="bfloat16")[0]


def _drain(eng):
    out = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = [(r.token_ids, list(r.logp)) for r in o.results]
    return out


@pytest.mark.slow
@pytest.mark.skipif(not L.onednn_bf16_supported(), reason="no native bf16 on this CPU: bf16 is not packed here")
def test_bf16_request_alone_or_batched_gives_the_same_tokens_and_log_probs():
    """The default model in bf16, engines that batch (max_batch 4): a request's tokens and log-probs
    are the same alone as with another request beside it whose rows come and go (the batch moves
    between 1 and 4 rows). Before `one_row_engine`, steps where the request was the one decoding row
    took the gemv, whose logits differ in a few last bits from the packed kernel's on the 49152-wide
    logits weight: seeds 0 and 3 here gave other tokens."""
    import powersample_fast as pf
    from powersample_fast.engine import Engine
    from powersample_fast.sampling_params import SamplingParams

    model, tok = pf.load("default", device="cpu", dtype="bfloat16")
    ids = tok.encode("Tom has 3 apples and buys 5 more. How many apples does he have now?")
    other = tok.encode("Write a short poem about the sea and the wind.")
    for seed in (0, 3):
        mine = SamplingParams(method="plain", max_new_tokens=48, n=1, seed=seed)
        alone_eng = Engine(model, tok, max_batch=4, max_len=128)
        alone_eng.add_request(ids, mine, request_id="a")
        alone = _drain(alone_eng)["a"]
        eng = Engine(model, tok, max_batch=4, max_len=128)
        eng.add_request(ids, mine, request_id="a")
        eng.add_request(other, SamplingParams(method="plain", max_new_tokens=12, n=3, seed=99), request_id="b")
        assert _drain(eng)["a"] == alone, seed
        assert eng.stats["max_batch_rows"] == 4


@pytest.mark.skipif(not L.onednn_bf16_supported(), reason="no native bf16 on this CPU: bf16 is not packed here")
def test_a_one_row_engine_takes_the_one_row_gemv(bf16_llama, monkeypatch):
    from powersample_fast.engine import Engine
    from powersample_fast.sampling_params import SamplingParams

    seen = []
    real = L.takes_gemv
    monkeypatch.setattr(L, "takes_gemv", lambda dtype, rows: seen.append(real(dtype, rows)) or seen[-1])
    for max_batch, expect in ((1, True), (2, False)):
        seen.clear()
        eng = Engine(bf16_llama, max_batch=max_batch, max_len=64)
        eng.add_request([5, 17, 3], SamplingParams(method="plain", max_new_tokens=4, n=1, seed=3), request_id="a")
        _drain(eng)
        assert any(seen) == expect, (max_batch, seen)


# ---------------------------------------------------------------------------------------------
# fp32 kernels (csrc/fused_f32.cpp: AVX2 + FMA), the default dtype of CPUs without native bf16
# ---------------------------------------------------------------------------------------------
needs_f32 = pytest.mark.skipif(not cpu_kernels.has_dtype(torch.float32),
                               reason=f"the fp32 CPU kernels are off here ({cpu_kernels.kernels_off_reason() or 'no AVX2/FMA'})")


@needs_f32
@pytest.mark.parametrize("B,T,H,Hk,D,R", [(1, 1, 9, 3, 64, 64), (2, 3, 4, 2, 16, 8)])
def test_fp32_rope_is_apply_rope_bit_for_bit(B, T, H, Hk, D, R):
    from powersample_fast.models.layers import apply_rope

    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, T, (H + 2 * Hk) * D + 3, generator=g)[..., :-3]
    cos, sin = torch.randn(B, 1, T, R, generator=g), torch.randn(B, 1, T, R, generator=g)
    expect = apply_rope(qkv[..., :(H + Hk) * D].view(B, T, H + Hk, D).transpose(1, 2), cos, sin, R)
    assert torch.equal(cpu_kernels.rope(qkv, cos, sin, H + Hk, D, R), expect)  # no FMA contraction: exact


@needs_f32
def test_fp32_ops_are_the_exact_values_within_fp32_rounding():
    """Against fp64 computations of the same formulas: within a few fp32 ulps, as torch's own fp32
    ops; each with a wrong variant the bound rejects."""
    from powersample_fast.models.layers import RMSNorm

    g = torch.Generator().manual_seed(12)
    gu = torch.randn(3, 1, 2 * 1536, generator=g) * 4
    gate, up = gu.double().chunk(2, dim=-1)
    exact = gate / (1 + torch.exp(-gate)) * up
    assert ((cpu_kernels.silu_mul(gu).double() - exact).abs() <= 2.0 ** -20 * exact.abs() + 1e-30).all()
    norm = RMSNorm(576, 1e-5)
    norm.weight.data = torch.randn(576, generator=g)
    xs = torch.randn(4, 1, 576, generator=g) * 3
    exact = norm.weight.double() * xs.double() / torch.sqrt(xs.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert ((norm(xs).double() - exact).abs() <= 2.0 ** -20 * exact.abs() + 1e-30).all()
    assert not ((cpu_kernels.rms_norm(xs, norm.weight, 1.0).double() - exact).abs() <= 2.0 ** -20 * exact.abs()).all()
    q, kv = torch.randn(2, 3, 3, 64, generator=g), torch.randn(2, 3, 3, 50, 64, generator=g)
    k, v = kv[0, 1:, :, :41], kv[1, 1:, :, :41]
    visible = torch.rand(2, 1, 3, 41, generator=g) < 0.7
    visible[..., 0] = True
    mask = torch.zeros(2, 1, 3, 41).masked_fill_(~visible, float("-inf"))
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    assert ((cpu_kernels.attn_decode(q, k, v, mask).double() - exact).abs() <= 1e-5).all()
    unmasked = cpu_kernels.attn_decode(q, k, v, torch.zeros_like(mask))
    assert not ((unmasked.double() - exact).abs() <= 1e-5).all()


@needs_f32
def test_fp32_model_logits_with_the_kernels_are_torchs_within_fp32_rounding(tmp_path):
    """A random Llama decoding in fp32, with the fused ops and in a one-row engine (MKL's sgemv for
    its linears): logits within 1e-5 of torch's ops and the packed kernel (fp32 rounding through 2
    layers)."""
    import powersample_fast as pf
    from helpers.tiny_models import random_llama
    from powersample_fast.engine.kv_cache import KVCache

    random_llama(seed=3, weight_std=0.1, vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).save_pretrained(tmp_path / "m")
    model = pf.load(tmp_path / "m", device="cpu", dtype="float32")[0]

    def decode(fused):
        cpu_kernels.set_fused_ops(fused)
        try:
            cache = KVCache(model.config, 1, 32, dtype=model.dtype)
            out = [model.forward_cached(torch.tensor([[5, 17, 3, 60, 8]]), cache, last_only=True)[:, -1]]
            for t in [3, 9, 27, 81, 1, 2, 4, 8]:
                with (L.one_row_engine() if fused else contextlib.nullcontext()):
                    out.append(model.forward_cached(torch.tensor([[t]]), cache)[:, -1])
            return torch.cat(out)
        finally:
            cpu_kernels.set_fused_ops(True)

    ours, torchs = decode(True), decode(False)
    assert (ours - torchs).abs().max() <= 1e-5 * torchs.abs().max()
