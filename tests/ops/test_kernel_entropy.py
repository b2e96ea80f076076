"""The entropy output of the fused sampling pass (issue 22): csrc_triton.sample_logprobs(...,
entropy=True) against reference.sample_logprobs(..., entropy=True), the reference against an fp64
entropy, and tok/lp/lq unchanged (same bits) by asking for it.

On a machine without CUDA the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py).
"""
import pytest
import torch

import csrc_triton
from powersample_fast import ops
from powersample_fast.ops import reference as ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL, RTOL = 1e-4, 1e-5  # as lp/lq in test_kernel_sample.py: fp32 sums in another order


def _logits(R, V, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(R, V, generator=g) * scale).to(dtype).to(DEVICE)


def _keys(R, seed=1):
    return ref.row_key(torch.full((R,), seed), torch.arange(R) + 11).to(DEVICE)


def _exact_entropy(z):
    p = torch.softmax(z.double(), -1)
    return -(p * torch.log_softmax(z.double(), -1)).nan_to_num(0.0).sum(-1)


def _check(z, keys, inv_tau, thr, **kw):
    tok, lp, lq, h = csrc_triton.sample_logprobs(z, keys, inv_tau, thr, entropy=True, **kw)
    rtok, rlp, rlq, rh = ref.sample_logprobs(z, keys, inv_tau, thr, entropy=True)
    assert h.dtype == torch.float32 and h.shape == lp.shape
    assert torch.equal(tok, rtok)
    torch.testing.assert_close(h, rh, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(rh.double().cpu(), _exact_entropy(z).cpu(), atol=ATOL, rtol=RTOL)
    # asking for the entropy changes nothing else, bit for bit (kernel and reference)
    k3 = csrc_triton.sample_logprobs(z, keys, inv_tau, thr, **kw)
    r3 = ref.sample_logprobs(z, keys, inv_tau, thr)
    for a, b in zip((tok, lp, lq), k3):
        assert torch.equal(a, b)
    for a, b in zip((rtok, rlp, rlq), r3):
        assert torch.equal(a, b)
    return h


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inv_tau,top_k", [(1.0, None), (4.0, 40)])
def test_entropy_matches_reference_v32003(dtype, inv_tau, top_k):
    z = _logits(3, 32003, dtype, seed=3)
    _check(z, _keys(3), inv_tau, ref.topk_threshold(z, top_k))


@pytest.mark.parametrize("num_splits", [2, 5])
def test_entropy_split_vocab_matches_reference(num_splits):
    z = _logits(4, 5003, torch.float16, scale=0.5, seed=5)
    _check(z, _keys(4, seed=2), 1.0, ref.topk_threshold(z, 7), num_splits=num_splits)


def test_entropy_near_deterministic_and_uniform_rows():
    """Near-deterministic rows: h = log s - sum(e d)/s adds two terms >= 0 (no cancellation), so
    h is accurate to the fp32 rounding of s near 1 (~1e-7 absolute); a flat row gives log V; -inf
    entries (a masked vocabulary) count as probability 0."""
    V = 1000
    z = torch.zeros(4, V)
    z[0, 17] = 20.0                      # p(17) = 1 - 999 e^-20: h ~ 2e-5
    z[1, 3] = 40.0                       # h ~ 1.7e-14
    z[3, 100:] = float("-inf")           # uniform over 100 tokens
    z = z.to(DEVICE)
    h = _check(z, _keys(4), 1.0, None)
    exact = _exact_entropy(z)
    torch.testing.assert_close(h[0].double().cpu(), exact[0].cpu(), rtol=0, atol=3e-7)
    assert 0.0 <= float(h[1]) < 3e-7
    torch.testing.assert_close(h[2].double().cpu(), torch.tensor(V, dtype=torch.float64).log(), rtol=1e-6, atol=0)
    torch.testing.assert_close(h[3].double().cpu(), torch.tensor(100.0, dtype=torch.float64).log(), rtol=1e-6, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_entropy_non_finite_propagates():
    z = _logits(2, 300, torch.float32, seed=10)
    z[0, 12] = float("nan")
    keys = _keys(2)
    for ns in (None, 3):
        _, _, _, h = csrc_triton.sample_logprobs(z, keys, 2.0, num_splits=ns, entropy=True)
        _, _, _, rh = ref.sample_logprobs(z, keys, 2.0, entropy=True)
        assert torch.isnan(h[0]) and torch.isnan(rh[0])
        torch.testing.assert_close(h[1], rh[1], atol=ATOL, rtol=RTOL)


def test_ops_dispatch_returns_entropy(monkeypatch):
    z = _logits(2, 100, torch.float32, seed=11)
    keys = _keys(2)
    for backend in ("torch", "triton"):
        monkeypatch.setenv("POWERSAMPLE_FAST_BACKEND", backend)
        out = ops.sample_logprobs(z, keys, 2.0, None, entropy=True)
        assert len(out) == 4
        assert len(ops.sample_logprobs(z, keys, 2.0, None)) == 3
        torch.testing.assert_close(out[3], ref.sample_logprobs(z, keys, 2.0, entropy=True)[3], atol=ATOL, rtol=RTOL)


# ---------------------------------------------------------------------------------------------
# mh_accept_ with the entropy cut's index term (index_term) and the h buffers (cur_h / prop_h)
# ---------------------------------------------------------------------------------------------
NAMES = ("cur_tok", "cur_lp", "cur_lq", "cur_len", "prop_tok", "prop_lp", "prop_lq", "prop_len")


def _mh_buffers(S, T, seed):
    g = torch.Generator().manual_seed(seed)
    b = dict(cur_tok=torch.randint(0, 1000, (S, T), generator=g), cur_lp=-torch.rand(S, T, generator=g) * 4,
             cur_lq=-torch.rand(S, T, generator=g) * 2, cur_len=torch.randint(1, T + 1, (S,), generator=g),
             prop_tok=torch.randint(0, 1000, (S, T), generator=g), prop_lp=-torch.rand(S, T, generator=g) * 4,
             prop_lq=-torch.rand(S, T, generator=g) * 2, prop_len=torch.randint(1, T + 1, (S,), generator=g),
             cur_h=torch.rand(S, T, generator=g) * 3, prop_h=torch.rand(S, T, generator=g) * 3)
    return {k: v.to(DEVICE) for k, v in b.items()}, g


@pytest.mark.parametrize("T", [37, 1100])
def test_mh_accept_index_term_and_h_commit_match_reference(T):
    S = 6
    bufs, g = _mh_buffers(S, T, seed=T)
    rows = torch.tensor([3, 0, 5, 1])
    cut = torch.stack([torch.randint(0, int(bufs["cur_len"][r]), (1,), generator=g)[0] for r in rows])
    base = torch.zeros(4, dtype=torch.int64)
    idx = (torch.randn(4, generator=g) * 2).float()
    rows, cut, base, idx = rows.to(DEVICE), cut.to(DEVICE), base.to(DEVICE), idx.to(DEVICE)

    def run(fn, log_u, index_term=idx):
        b = {k: v.clone() for k, v in bufs.items()}
        acc, la = fn(*(b[k] for k in NAMES), rows, cut, base, log_u, 4.0, index_term=index_term,
                     cur_h=b["cur_h"], prop_h=b["prop_h"])
        return b, acc, la

    _, _, la0 = run(ref.mh_accept_, torch.zeros(4, device=DEVICE))
    _, _, la_plain = run(ref.mh_accept_, torch.zeros(4, device=DEVICE), index_term=None)
    t, t2 = bufs["cur_len"][rows].float(), bufs["prop_len"][rows].float()
    # the index term replaces log t - log t' and nothing else
    torch.testing.assert_close(la0 - idx, la_plain - (t.log() - t2.log()), atol=1e-4, rtol=1e-5)
    side = torch.tensor([-0.05, 0.05, -0.05, 0.05], device=DEVICE)  # decisions not at fp32 rounding
    log_u = la0 + side
    rb, racc, rla = run(ref.mh_accept_, log_u)
    kb, kacc, kla = run(csrc_triton.mh_accept_, log_u)
    assert racc.tolist() == [True, False, True, False]
    assert torch.equal(kacc, racc)
    torch.testing.assert_close(kla, rla, atol=1e-4, rtol=1e-5)
    for k in NAMES + ("cur_h", "prop_h"):
        assert torch.equal(kb[k], rb[k]), k
    for i, r in enumerate(rows.tolist()):  # accepted rows carry the proposal's entropies
        m, t2_ = int(cut[i]), int(bufs["prop_len"][r])
        want = bufs["prop_h"][r, m:t2_] if racc[i] else bufs["cur_h"][r, m:t2_]
        assert torch.equal(rb["cur_h"][r, m:t2_], want)


def test_mh_accept_rejects_half_h_and_bad_index_term():
    from powersample_fast.errors import ConfigError

    bufs, _ = _mh_buffers(3, 8, seed=1)
    rows = torch.tensor([0, 2], device=DEVICE)
    z = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    log_u = torch.zeros(2, device=DEVICE)
    args = [bufs[k] for k in NAMES] + [rows, z, z, log_u, 4.0]
    with pytest.raises(ConfigError, match="give both cur_h and prop_h"):
        csrc_triton.mh_accept_(*args, cur_h=bufs["cur_h"])
    with pytest.raises(ConfigError, match=r"index_term must have shape \(2,\)"):
        csrc_triton.mh_accept_(*args, index_term=torch.zeros(3, device=DEVICE))
    with pytest.raises(ConfigError, match="index_term must have dtype float32"):
        csrc_triton.mh_accept_(*args, index_term=torch.zeros(2, dtype=torch.float64, device=DEVICE))
