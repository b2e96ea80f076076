"""csrc_triton.mh_accept_ (batched MH test + in-place commit) against reference.mh_accept_."""
import pytest
import torch

import csrc_triton
from powersample_fast.ops import reference as ref
from powersample_fast.errors import ConfigError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CPU = DEVICE.type == "cpu"
NAMES = ("cur_tok", "cur_lp", "cur_lq", "cur_len", "prop_tok", "prop_lp", "prop_lq", "prop_len")


def _buffers(S, T, seed, min_len=1):
    g = torch.Generator().manual_seed(seed)
    b = dict(
        cur_tok=torch.randint(0, 1000, (S, T), generator=g),
        cur_lp=-torch.rand(S, T, generator=g) * 4,
        cur_lq=-torch.rand(S, T, generator=g) * 2,
        cur_len=torch.randint(min_len, T + 1, (S,), generator=g),
        prop_tok=torch.randint(0, 1000, (S, T), generator=g),
        prop_lp=-torch.rand(S, T, generator=g) * 4,
        prop_lq=-torch.rand(S, T, generator=g) * 2,
        prop_len=torch.randint(min_len, T + 1, (S,), generator=g),
    )
    return {k: v.to(DEVICE) for k, v in b.items()}, g


def _run(bufs, rows, cut, base, log_u, alpha, fn):
    b = {k: v.clone() for k, v in bufs.items()}
    acc, log_a = fn(*(b[k] for k in NAMES), rows, cut, base, log_u, alpha)
    return b, acc, log_a


def _compare(bufs, rows, cut, base, alpha, g):
    """log_u is put 0.05 away from the reference log_A (a random side), so the decision is not
    decided by fp32 rounding of the sums."""
    rows, cut, base = rows.to(DEVICE), cut.to(DEVICE), base.to(DEVICE)
    zero = torch.zeros(rows.shape[0], device=DEVICE)
    _, _, ref_log_a = _run(bufs, rows, cut, base, zero, alpha, ref.mh_accept_)
    side = torch.where(torch.rand(rows.shape[0], generator=g) < 0.5, -0.05, 0.05).to(DEVICE)
    log_u = torch.where(torch.isfinite(ref_log_a), ref_log_a + side, zero)
    rb, racc, rla = _run(bufs, rows, cut, base, log_u, alpha, ref.mh_accept_)
    kb, kacc, kla = _run(bufs, rows, cut, base, log_u, alpha, csrc_triton.mh_accept_)
    assert kacc.dtype == torch.bool and kla.dtype == torch.float32
    assert torch.equal(kacc, racc)
    # sums of up to T terms of magnitude <= 4, times alpha: fp32 summation-order error
    torch.testing.assert_close(kla, rla, atol=1e-4, rtol=1e-5, equal_nan=True)
    for k in NAMES:
        assert torch.equal(kb[k], rb[k]), k
    return kacc


@pytest.mark.parametrize("alpha", [1.0, 4.0])
@pytest.mark.parametrize("T", [53, 1500])
def test_random_moves_match_reference(alpha, T):
    S = 7
    bufs, g = _buffers(S, T, seed=T)
    rows = torch.randperm(S, generator=g)[:5]  # distinct, unsorted, not all rows
    cur_len = bufs["cur_len"].cpu()
    cut = torch.stack([torch.randint(0, int(cur_len[r]), (1,), generator=g)[0] for r in rows])
    cut[0] = 0  # cut at the first generated token
    base = torch.zeros(5, dtype=torch.int64)
    acc = _compare(bufs, rows, cut, base, alpha, g)
    assert acc.any() and not acc.all()


def test_last_block_index_term_and_equal_lengths():
    S, T, B = 6, 40, 16
    bufs, g = _buffers(S, T, seed=3, min_len=B + 1)
    bufs["prop_len"][:2] = bufs["cur_len"][:2]  # t' == t: index term 0
    rows = torch.arange(S)
    base = torch.full((S,), B)  # stage k = 2: offset (k-1)*B
    cut = torch.stack([torch.randint(B, int(t), (1,), generator=g)[0] for t in bufs["cur_len"].cpu()])
    _compare(bufs, rows, cut, base, 4.0, g)


def test_strided_buffers_are_committed_in_place():
    S, T = 5, 33
    bufs, g = _buffers(S, T + 7, seed=4)
    views = {k: (v[:, 3:T + 3] if v.dim() == 2 else v) for k, v in bufs.items()}
    views["cur_len"] = views["cur_len"].clamp(max=T)
    views["prop_len"] = views["prop_len"].clamp(max=T)
    assert not views["cur_lp"].is_contiguous()
    rows = torch.tensor([4, 1, 2])
    cut = torch.tensor([0, 1, 2])
    _compare(views, rows, cut, torch.zeros(3, dtype=torch.int64), 2.0, g)
    # in place through the view: the parent buffer changes exactly like the reference's
    parent = {k: v.clone() for k, v in bufs.items()}
    view = {k: (v[:, 3:T + 3] if v.dim() == 2 else v) for k, v in parent.items()}
    log_u = torch.full((3,), -1e30, device=DEVICE)  # accept all
    acc, _ = csrc_triton.mh_accept_(*(view[k] for k in NAMES), rows.to(DEVICE), cut.to(DEVICE),
                                    torch.zeros(3, dtype=torch.int64, device=DEVICE), log_u, 2.0)
    assert acc.all()
    for r, m in zip(rows.tolist(), cut.tolist()):
        t2 = min(int(bufs["prop_len"][r]), T)
        assert torch.equal(parent["cur_tok"][r, 3 + m:3 + t2], bufs["prop_tok"][r, 3 + m:3 + t2])
        assert torch.equal(parent["cur_tok"][r, :3 + m], bufs["cur_tok"][r, :3 + m])
        assert int(parent["cur_len"][r]) == int(bufs["prop_len"][r])


def test_empty_rows():
    bufs, _ = _buffers(3, 8, seed=5)
    e = torch.empty(0, dtype=torch.int64, device=DEVICE)
    acc, log_a = csrc_triton.mh_accept_(*(bufs[k] for k in NAMES), e, e, e,
                                        torch.empty(0, device=DEVICE), 4.0)
    assert acc.shape == log_a.shape == (0,)


@pytest.mark.parametrize("case,match", [
    ("cur_lp_fp16", "cur_lp must have dtype float32"),
    ("cur_tok_int32", "cur_tok must have dtype int64"),
    ("prop_lq_shape", r"prop_lq must have shape \(4, 8\)"),
    ("cur_len_shape", r"cur_len must have shape \(4,\)"),
    ("prop_len_float", "prop_len must have dtype int64"),
    ("rows_2d", "rows must be 1-D"),
    ("cut_shape", r"cut must have shape \(2,\)"),
    ("log_u_fp64", "log_u must have dtype float32"),
    ("base_device", "base is on meta"),
    ("alpha_zero", "alpha must be finite and > 0"),
])
def test_rejects_bad_inputs(case, match):
    bufs, _ = _buffers(4, 8, seed=6)
    rows, cut, base = (torch.tensor(v, device=DEVICE) for v in ([0, 2], [0, 0], [0, 0]))
    log_u = torch.zeros(2, device=DEVICE)
    alpha = 4.0
    if case == "cur_lp_fp16":
        bufs["cur_lp"] = bufs["cur_lp"].half()
    elif case == "cur_tok_int32":
        bufs["cur_tok"] = bufs["cur_tok"].int()
    elif case == "prop_lq_shape":
        bufs["prop_lq"] = bufs["prop_lq"][:, :5]
    elif case == "cur_len_shape":
        bufs["cur_len"] = bufs["cur_len"][:3]
    elif case == "prop_len_float":
        bufs["prop_len"] = bufs["prop_len"].float()
    elif case == "rows_2d":
        rows = rows[None]
    elif case == "cut_shape":
        cut = cut[:1]
    elif case == "log_u_fp64":
        log_u = log_u.double()
    elif case == "base_device":
        base = torch.zeros(2, dtype=torch.int64, device="meta")
    elif case == "alpha_zero":
        alpha = 0.0
    with pytest.raises(ConfigError, match=match):
        csrc_triton.mh_accept_(*(bufs[k] for k in NAMES), rows, cut, base, log_u, alpha)


@pytest.mark.skipif(not ON_CPU, reason="value checks run only for CPU tensors (no host sync on CUDA)")
def test_rows_out_of_range_on_cpu():
    bufs, _ = _buffers(4, 8, seed=7)
    z = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ConfigError, match=r"rows holds chain rows outside \[0, 4\)"):
        csrc_triton.mh_accept_(*(bufs[k] for k in NAMES), torch.tensor([4]), z, z,
                               torch.zeros(1), 4.0)
