"""cpu_linear.linear: fp32 (and, with native bf16, bf16) CPU linears through oneDNN with packed weights
(re-packed when a weight changes; bf16 bit-identical to F.linear; one bf16 row through torch's gemv within
the stated bound), and the joint q/k RoPE (bit for bit HF's rotate-half formula)."""
import copy
import gc

import pytest
import torch
import torch.nn.functional as F

from powersample_fast.models import cpu_linear as L
from powersample_fast.models import layers as M

pytestmark = pytest.mark.skipif(not L.onednn_linear_enabled(), reason="torch built without oneDNN")


@pytest.fixture(autouse=True)
def onednn_on():
    L.set_onednn_linear(True)
    yield
    L.set_onednn_linear(True)


@pytest.mark.parametrize("shape", [(0, 40), (1, 40), (3, 40), (8, 40), (17, 40), (2, 5, 40)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 40, generator=g)
    b = torch.randn(33, generator=g) if bias else None
    x = torch.randn(*shape, generator=g)
    y = L.linear(x, w, b)
    assert y.shape == (*shape[:-1], 33) and y.dtype == torch.float32
    # fp32 matmul over K=40 in another order: |error| ~ sqrt(K) * 2**-24 * |x||w|
    torch.testing.assert_close(y, F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_weight_changed_in_place_or_replaced_is_repacked():
    w = torch.randn(16, 8)
    x = torch.randn(4, 8)
    torch.testing.assert_close(L.linear(x, w), x @ w.t(), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        w.mul_(2.0)  # bumps the version counter
    torch.testing.assert_close(L.linear(x, w), x @ w.t(), atol=1e-5, rtol=1e-5)
    lin = torch.nn.Linear(8, 16)
    L.linear(x, lin.weight, lin.bias)
    lin.weight = torch.nn.Parameter(torch.randn(16, 8))  # a new tensor
    torch.testing.assert_close(L.linear(x, lin.weight, lin.bias), lin(x), atol=1e-5, rtol=1e-5)


def test_packed_copies_die_with_their_weights():
    w = torch.randn(16, 8)
    L.linear(torch.randn(2, 8), w)
    assert id(w) in L._PACKED
    key = id(w)
    del w
    gc.collect()
    assert key not in L._PACKED


def test_off_switch_mixed_dtypes_and_inference_tensors_use_torch():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(16, 8, generator=g), torch.randn(3, 8, generator=g)
    L.set_onednn_linear(False)
    assert torch.equal(L.linear(x, w), F.linear(x, w))
    wb = w.bfloat16()
    assert torch.equal(L.linear(x.bfloat16(), wb), F.linear(x.bfloat16(), wb)) and id(wb) not in L._PACKED
    L.set_onednn_linear(True)
    wh = w.half()  # fp16 is never packed
    assert torch.equal(L.linear(x.half(), wh), F.linear(x.half(), wh)) and id(wh) not in L._PACKED
    with torch.inference_mode():
        wi = torch.randn(16, 8)  # an inference tensor has no version counter: not packed
        assert torch.equal(L.linear(x, wi), F.linear(x, wi))


def test_model_with_packed_weights_deepcopies(toy_dir):
    import powersample_fast as pf

    model = pf.load(toy_dir, device="cpu", dtype="float32")[0]
    ids = torch.tensor([[0, 1, 2, 1]])
    a = model(ids)
    b = copy.deepcopy(model)(ids)  # packed copies live outside the module tree
    assert torch.equal(a, b)


needs_bf16 = pytest.mark.skipif(not L.onednn_bf16_supported(), reason="no native bf16 on this CPU")


@needs_bf16
@pytest.mark.parametrize("kn", [(576, 960), (1536, 576), (40, 33), (16, 8)])  # default model's shapes, small ones
@pytest.mark.parametrize("rows", [(0,), (1,), (3,), (8,), (17,), (2, 5)])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_packed_equals_f_linear_bit_for_bit(kn, rows, bias):
    K, N = kn
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(N, K, generator=g) * 0.05).bfloat16()
    b = torch.randn(N, generator=g).bfloat16() if bias else None
    x = torch.randn(*rows, K, generator=g).bfloat16()
    L.set_bf16_gemv(False)  # one row too on the packed kernel
    try:
        y = L.linear(x, w, b)
    finally:
        L.set_bf16_gemv(True)
    assert id(w) in L._PACKED  # took the packed path
    assert y.dtype == torch.bfloat16 and torch.equal(y, F.linear(x, w, b))


@needs_bf16
@pytest.mark.parametrize("kn", [(576, 960), (1536, 576), (576, 49152), (40, 33)])
@pytest.mark.parametrize("shape", [(1,), (1, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_one_row_gemv_is_torch_gemv_within_the_stated_bound(kn, shape, bias):
    """One bf16 row in a one-row engine (`one_row_engine`) with cpu_kernels' gemv off runs torch's
    gemv (F.linear with oneDNN off), bit for bit; against the packed
    kernel it differs by at most one bf16 ulp (each result rounded once, <= half an ulp each) plus
    the fp32 summation-order difference (cpu_linear's docstring):
    |y - y_packed| <= 2**-7 max(|y|, |y_packed|) + 2 K 2**-24 sum_k |x_k w_k| (+ an ulp for the bias
    add). oneDNN's switch is back on afterwards."""
    K, N = kn
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(N, K, generator=g) * 0.05).bfloat16()
    b = torch.randn(N, generator=g).bfloat16() if bias else None
    x = torch.randn(*shape, K, generator=g).bfloat16()
    assert not L.takes_gemv(torch.bfloat16, 1)  # outside a one-row engine: the packed kernel
    L.set_bf16_gemv(True, kernel=False)  # torch's gemv, not cpu_kernels' kernel (tests/models/test_cpu_kernels.py)
    try:
        with L.one_row_engine():
            assert L.takes_gemv(torch.bfloat16, 1) and not L.takes_gemv(torch.bfloat16, 2)
            y = L.linear(x, w, b)
    finally:
        L.set_bf16_gemv(True, kernel=True)
    assert torch.backends.mkldnn.enabled
    with L.onednn_matmul_off():
        assert torch.equal(y, F.linear(x, w, b))
    yp = L.linear(x, w, b).float()  # outside: the packed kernel
    mag = (x.float().abs().reshape(1, K) @ w.float().abs().t()).reshape(yp.shape)
    big = torch.maximum(y.float().abs(), yp.abs())
    bound = 2.0 ** -7 * big * (2 if bias else 1) + 2 * K * 2.0 ** -24 * mag
    assert ((y.float() - yp).abs() <= bound).all()


@needs_bf16
def test_bf16_model_logits_packed_equal_unpacked(toy_dir):
    """The whole model in bf16 (full forward and a cached prefill + decode): packed == torch's path."""
    import powersample_fast as pf
    from powersample_fast.engine.kv_cache import KVCache

    model = pf.load(toy_dir, device="cpu", dtype="bfloat16")[0]
    ids = torch.tensor([[0, 1, 2, 1, 3], [2, 2, 0, 1, 1]])
    out = {}
    for on in (True, False):
        L.set_onednn_linear(on)
        cache = KVCache(model.config, 2, 16, dtype=model.dtype)
        pre = model.forward_cached(ids, cache)
        dec = model.forward_cached(ids[:, :1], cache)
        out[on] = (model(ids), pre, dec)
    assert all(torch.equal(a, b) for a, b in zip(out[True], out[False]))


@pytest.mark.parametrize("rotary_dim,dtype", [(16, torch.float32), (8, torch.float32), (16, torch.bfloat16)])
def test_rope_is_hf_rotate_half_bit_for_bit(rotary_dim, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 3, 16, generator=g).to(dtype)  # [B, H, T, D]
    freqs = torch.randn(2, 3, rotary_dim // 2, generator=g) * 3
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def rotate_half(t):
        t1, t2 = t.chunk(2, dim=-1)
        return torch.cat((-t2, t1), dim=-1)

    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    expect = torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)
    s1, s2 = sin.chunk(2, dim=-1)
    assert torch.equal(M.apply_rope(x, cos, torch.cat((-s1, s2), dim=-1), rotary_dim), expect)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
def test_a_decode_rows_bits_do_not_depend_on_the_row_count(dtype):
    """Batch invariance at the linear layer: a decode row (x [B, 1, K]) gets the same bits whatever B,
    on the default model's widest weight (49152 x 576), where oneDNN's packed bf16 kernel changes a
    row's bits from 33 rows on (calls are cut into 32-row chunks, `ROW_CHUNK`)."""
    g = torch.Generator().manual_seed(13)
    w = (torch.randn(49152, 576, generator=g) * 0.05).to(dtype)
    x = torch.randn(64, 1, 576, generator=g).to(dtype)
    alone = torch.cat([L.linear(x[i:i + 1], w) for i in (0, 31, 40, 63)])
    for B in (2, 17, 32, 33, 40, 64):
        y = L.linear(x[:B], w)
        got = torch.cat([y[i:i + 1] for i in (0, 31, 40, 63) if i < B])
        assert torch.equal(got, alone[:len(got)]), B
