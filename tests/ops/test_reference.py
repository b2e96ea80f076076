"""The reference's CPU shortcut (Gumbel noise only for candidates near the row max) is exact."""
import pytest
import torch

from powersample_fast.ops import reference as R


@pytest.mark.parametrize("V", [32003, 151936])
@pytest.mark.parametrize("inv_tau", [0.5, 1.0, 4.0])
def test_pruned_gumbel_argmax_equals_full(V, inv_tau):
    g = torch.Generator().manual_seed(V)
    B = 7
    mism = 0
    for trial in range(6):
        z = torch.randn(B, V, generator=g) * (0.3 + trial)
        z[2, :100] = float("-inf")  # masked tokens (as top-k masking produces)
        z[3, 5] = 40.0  # one dominant token
        z[4] = 0.0  # a flat row: every token is a candidate
        zt = z * inv_tau
        keys = R.row_key(torch.arange(B) + 100 * trial, torch.full((B,), trial))
        full = torch.argmax(zt + R.gumbel(keys, V), dim=-1)
        mism += int((R._gumbel_argmax(zt, keys) != full).sum())
    assert mism == 0


def test_nan_rows_take_the_full_path():
    z = torch.randn(3, 5000)
    z[1, 17] = float("nan")
    keys = R.row_key(torch.arange(3), torch.zeros(3, dtype=torch.long))
    tok = R._gumbel_argmax(z, keys)
    assert tok[1] == 17  # torch.argmax semantics: the first NaN wins
    assert torch.equal(tok, torch.argmax(z + R.gumbel(keys, 5000), dim=-1))


def test_row_key_int_matches_tensor_version():
    seeds = [0, 1, 0xFFFFFFFF, 123456789, 2**31 + 5]
    counters = [0, 1, 5317, 2**32 + 3, 10**12]
    st = torch.tensor([s for s in seeds for _ in counters])
    ct = torch.tensor([c for _ in seeds for c in counters])
    expect = R.row_key(st, ct).tolist()
    assert [R.row_key_int(s, c) for s in seeds for c in counters] == expect


def _special_rows(V, g):
    z = torch.randn(9, V, generator=g)
    z[1] *= 40.0  # most terms below exp(-87) of the max (the slow-exp range that _logsumexp skips)
    z[2, :V // 2] = float("-inf")  # top-k masked
    z[3] = float("-inf")  # all masked
    z[4, 7] = float("inf")
    z[5, 11] = float("nan")
    z[6, 3] = float("-inf")
    z[6, 5] = float("inf")
    z[7] = 0.0  # flat
    z[8] *= 0.01
    return z


@pytest.mark.parametrize("V", [61, 49152])
def test_logsumexp_equals_torch_bitwise(V):
    """_logsumexp zeroes the terms below exp(-87) instead of evaluating them: torch's result, bit for bit."""
    g = torch.Generator().manual_seed(1)
    for scale in (1.0, 4.0, 25.0):
        z = _special_rows(V, g) * scale
        a, b = R._logsumexp(z), torch.logsumexp(z, dim=-1)
        assert torch.equal(a.nan_to_num(nan=1234.5), b.nan_to_num(nan=1234.5)), (a, b)


@pytest.mark.parametrize("V", [5000, 49152])
@pytest.mark.parametrize("inv_tau,top_k", [(1.0, None), (4.0, None), (0.5, None), (1.0, 30), (4.0, 50)])
def test_sample_logprobs_equals_the_unfused_formula(V, inv_tau, top_k):
    """The CPU reference (shared max, candidate-only noise, lq = lp at temperature 1 without top-k) gives
    the definition's tokens and log-probs bit for bit (finite rows; non-finite ones propagate)."""
    g = torch.Generator().manual_seed(V + int(inv_tau * 10))
    for trial in range(4):
        z = torch.randn(6, V, generator=g) * (0.5 + 3 * trial)
        z[2, 13] = 30.0
        keys = R.row_key(torch.arange(6) + 7 * trial, torch.full((6,), trial))
        thr = R.topk_threshold(z, top_k)
        zt = z * inv_tau
        if thr is not None:
            zt = zt.masked_fill(z < thr[:, None], float("-inf"))
        tok = torch.argmax(zt + R.gumbel(keys, V), dim=-1)
        lp = z.gather(1, tok[:, None])[:, 0] - torch.logsumexp(z, dim=-1)
        lq = zt.gather(1, tok[:, None])[:, 0] - torch.logsumexp(zt, dim=-1)
        t2, lp2, lq2 = R.sample_logprobs(z, keys, inv_tau, thr)
        assert torch.equal(t2, tok) and torch.equal(lp2, lp) and torch.equal(lq2, lq)
