"""The sampling kernel's law: token frequencies of csrc_triton.sample_logprobs and of its torch
reference follow softmax(z * inv_tau) (chi-square), with and without top-k. On a machine without
CUDA the kernel runs under TRITON_INTERPRET=1 (conftest.py)."""
import pytest
import torch

import csrc_triton
from powersample_fast.ops import reference as ref

pytestmark = pytest.mark.slow
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CPU = DEVICE.type == "cpu"


def test_token_frequencies_follow_softmax():
    """Chi-square of token counts against softmax(z*inv_tau) (with and without top-k). The kernel
    draws the tokens that the reference draws (checked on every row here); the interpreter costs
    ~6 ms a row, so on CPU the kernel runs on the first 600 of 20000 reference draws."""
    stats = pytest.importorskip("scipy.stats", reason="the chi-square test needs scipy")

    V, inv_tau, n = 10, 1.5, 20000
    z0 = torch.tensor([0.3, -1.0, 1.2, 0.0, 0.8, -0.5, 0.1, 1.0, -0.2, 0.5])
    z = z0.expand(n, V).contiguous().to(DEVICE)
    keys = ref.row_key(torch.full((n,), 12345), torch.arange(n)).to(DEVICE)
    n_kernel = 600 if ON_CPU else n
    for top_k in (None, 6):
        thr = ref.topk_threshold(z, top_k)
        zt = z0 * inv_tau
        if top_k is not None:
            zt = zt.masked_fill(z0 < z0.topk(top_k).values[-1], float("-inf"))
        p = torch.softmax(zt.double(), 0)
        rtok, _, _ = ref.sample_logprobs(z, keys, inv_tau, thr)
        tok, _, _ = csrc_triton.sample_logprobs(
            z[:n_kernel], keys[:n_kernel], inv_tau, None if thr is None else thr[:n_kernel])
        assert torch.equal(tok, rtok[:n_kernel])
        for draws in (tok, rtok):
            counts = torch.bincount(draws.cpu(), minlength=V).double()
            keep = p > 0
            assert counts[~keep].sum() == 0  # never outside the top-k
            # p-value of the chi-square statistic; 1e-4: a false alarm once in 10^4 seeds
            pval = stats.chisquare(counts[keep].numpy(), (p[keep] * counts.sum()).numpy()).pvalue
            assert pval > 1e-4, (top_k, counts, p)
