"""csrc_triton.topn (top-N log-probs over a step's logits) against reference_topn.

On a machine without CUDA the kernel runs on CPU tensors under TRITON_INTERPRET=1 (conftest.py).
Ids must match the reference exactly (random logits: no ties), values to fp32 rounding (the
kernel's online logsumexp sums in another order). Within one call, a token that is its row's
argmax has its own log-prob bit-identical to the first top value: lm-eval's is_greedy compares them.
"""
import pytest
import torch

import csrc_triton
from powersample_fast import ops
from powersample_fast.ops import reference_topn
from powersample_fast.errors import ConfigError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ATOL, RTOL = 1e-4, 1e-5


def _logits(B, V, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g) * scale).to(dtype).to(DEVICE)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("V,n", [(61, 5), (1000, 20), (40000, 3), (7, 0), (5, 8)])
def test_kernel_matches_reference(dtype, V, n):
    z = _logits(6, V, dtype, seed=V + n)
    rows = torch.tensor([4, 0, 2, 5], device=DEVICE)
    am = z.float().argmax(-1)
    toks = torch.stack([am[4], torch.tensor(3 % V, device=DEVICE), am[2], torch.tensor(1 % V, device=DEVICE)])
    own, ids, vals = csrc_triton.topn_logprobs(z, rows, toks, n)
    rown, rids, rvals = reference_topn.topn_logprobs(z, rows, toks, n)
    k = min(n, V)
    assert ids.shape == rids.shape == (4, k) and vals.shape == (4, k) and own.dtype == torch.float32
    assert torch.equal(ids, rids)
    torch.testing.assert_close(vals, rvals, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(own, rown, atol=ATOL, rtol=RTOL)
    full = torch.log_softmax(z.float().index_select(0, rows), -1)
    torch.testing.assert_close(own, full.gather(1, toks[:, None])[:, 0], atol=ATOL, rtol=RTOL)
    if k:
        assert torch.equal(ids[:, 0], full.argmax(-1))
        assert bool((vals[:, :-1] >= vals[:, 1:]).all())
        # rows 0 and 2 asked for their argmax: own log-prob == first top value, bit for bit
        for impl_own, impl_vals in ((own, vals), (rown, rvals)):
            assert _bits_equal(impl_own[[0, 2]], impl_vals[[0, 2], 0])


def test_ties_lower_id_first_and_nan_excluded():
    z = torch.full((2, 300), -5.0, device=DEVICE)
    z[0, [7, 250, 3, 100]] = 2.0  # a 4-way tie across tiles
    z[1, 5] = float("nan")
    z[1, 9] = 1.0
    rows = torch.tensor([0, 1], device=DEVICE)
    toks = torch.tensor([250, 9], device=DEVICE)
    own, ids, vals = csrc_triton.topn_logprobs(z, rows, toks, 3)
    assert ids[0].tolist() == [3, 7, 100]
    assert _bits_equal(own[:1], vals[0, :1])  # a tied argmax is greedy too
    assert ids[1, 0].item() == 9  # the NaN logit is not a top token; its row's values are NaN (lse is)
    assert torch.isnan(own[1]) and torch.isnan(vals[1]).all()
    rown, rids, rvals = reference_topn.topn_logprobs(z, rows[:1], toks[:1], 3)
    assert rids[0].tolist() == [3, 7, 100] and _bits_equal(rown, rvals[:, 0])


def test_ops_dispatch_and_checks():
    z = _logits(3, 50)
    rows = torch.tensor([1], device=DEVICE)
    toks = torch.tensor([2], device=DEVICE)
    own, ids, vals = ops.topn_logprobs(z, rows, toks, 4)
    assert ids.shape == (1, 4)
    with pytest.raises(ConfigError, match="n must be"):
        csrc_triton.topn_logprobs(z, rows, toks, 99)
    with pytest.raises(ConfigError, match="tokens must have shape"):
        csrc_triton.topn_logprobs(z, rows, torch.tensor([1, 2], device=DEVICE), 2)
    if DEVICE.type == "cpu":
        with pytest.raises(ConfigError, match="rows must lie"):
            csrc_triton.topn_logprobs(z, torch.tensor([3]), toks, 2)
