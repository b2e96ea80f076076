"""cpu_linear.linear: fp32 CPU linears through oneDNN with packed weights (re-packed when a weight changes),
and the joint q/k RoPE (bit for bit HF's rotate-half formula)."""
import copy
import gc

import pytest
import torch
import torch.nn.functional as F

from powersample_fast import cpu_linear as L
from powersample_fast import model as M

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


def test_off_switch_bf16_and_inference_tensors_use_torch():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(16, 8, generator=g), torch.randn(3, 8, generator=g)
    L.set_onednn_linear(False)
    assert torch.equal(L.linear(x, w), F.linear(x, w))
    L.set_onednn_linear(True)
    wb, xb = w.bfloat16(), x.bfloat16()
    assert torch.equal(L.linear(xb, wb), F.linear(xb, wb))
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
