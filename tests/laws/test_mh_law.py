"""The fast sampler's law on an enumerable toy model (vocab 4, EOS 3, prompt [0, 1], 4 new tokens,
block 2): exact laws from helpers/laws.py, bounds from sampling noise (chi-square p-values; TV to pi
within the 99.9% quantile of the TV of the same number of exact draws of the N-step law)."""
import numpy as np
import pytest
import torch
from scipy.stats import chi2_contingency

import powersample_fast as pf
from powersample_fast.naive import NaiveSampler
from helpers.laws import (
    chi_square_pvalue,
    counts_of,
    exact_power_law,
    low_temperature_law,
    mh_chain_law,
    proposal_law,
    sample_law,
    toy_tree,
    tv,
)

from helpers.laws import ALPHA, B, EOS, P_MIN, PROMPT, T


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def sampler(toy_dir):
    model, _ = pf.load(toy_dir, device="cpu", dtype="float32")
    return pf.PowerSampler(model)


def _run(sampler, n, **kw):
    kw = {"alpha": ALPHA, "max_new_tokens": T, "block_size": B, "n": n, "progress": False, "max_batch": 128, **kw}
    return sampler.generate(PROMPT, **kw)


@pytest.mark.parametrize("tau,top_k", [(None, None), (1.0, 2)], ids=["default-tau", "top-k"])
def test_no_mcmc_is_the_proposal_chain(sampler, toy_dir, tau, top_k):
    res = _run(sampler, 3000, mcmc_steps=0, proposal_temperature=tau, top_k=top_k, seed=21)
    tau_ = tau or 1.0 / ALPHA
    law = proposal_law(toy_dir, PROMPT, tau_, T, EOS, top_k=top_k)
    assert chi_square_pvalue(counts_of(r.token_ids for r in res), law) > P_MIN
    tree = toy_tree(toy_dir, PROMPT, T, EOS)
    for r in res[:100]:  # per-token log-probs equal the exact fp64 values
        s = tuple(r.token_ids)
        np.testing.assert_allclose(r.logp, tree.token_logprobs(s), atol=1e-5)
        np.testing.assert_allclose(r.logq, tree.token_logprobs(s, tau_, top_k), atol=1e-5)


def test_converges_to_power_law(sampler, toy_dir):
    n, steps = 3000, 12
    res = _run(sampler, n, mcmc_steps=steps, proposal_temperature=1.0, seed=22)
    counts = counts_of(r.token_ids for r in res)
    pi = exact_power_law(toy_dir, PROMPT, ALPHA, T, EOS)
    low = low_temperature_law(toy_dir, PROMPT, ALPHA, T, EOS)
    chain = mh_chain_law(toy_dir, PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=steps,
                         eos_id=EOS, proposal_temperature=1.0)
    assert chi_square_pvalue(counts, chain) > P_MIN
    # bound: the 99.9% quantile of TV(pi, n exact draws of the N-step law), i.e. sampling noise plus
    # the computed gap of the N-step law to pi (a false alarm once in 1000 runs)
    rng = np.random.default_rng(0)
    bound = float(np.quantile([tv(pi, sample_law(chain, n, rng)) for _ in range(1000)], 0.999))
    assert tv(pi, counts) < bound, (tv(pi, counts), bound, tv(chain, pi))
    assert tv(low, pi) - bound > 0.1
    assert chi_square_pvalue(counts, low) < 1e-6  # and the samples are not from the low-temperature law


@pytest.mark.parametrize("index,tau", [("uniform", None), ("last_block", 1.0), ("uniform", 0.5)])
def test_few_steps_exact_law(sampler, toy_dir, index, tau):
    """3 MH steps: chi-square against the exact 3-step law (index term and EOS-length changes
    active), and far from the proposal chain's law."""
    n, steps = 3000, 3
    res = _run(sampler, n, mcmc_steps=steps, proposal_temperature=tau, index=index, seed=23)
    counts = counts_of(r.token_ids for r in res)
    chain = mh_chain_law(toy_dir, PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=steps,
                         eos_id=EOS, proposal_temperature=tau, index=index)
    prop = proposal_law(toy_dir, PROMPT, tau or 1.0 / ALPHA, T, EOS)
    assert chi_square_pvalue(counts, chain) > P_MIN
    assert chi_square_pvalue(counts, prop) < 1e-6
    assert 0 < sum(r.accepted for r in res) < sum(r.proposed for r in res)


def test_fast_and_naive_agree(sampler, toy_dir):
    """Two-sample chi-square between the fast sampler and the naive baseline (HF generate)."""
    kw = dict(mcmc_steps=3, proposal_temperature=None)
    fast = counts_of(r.token_ids for r in _run(sampler, 2000, seed=24, **kw))
    naive = NaiveSampler(toy_dir, device="cpu", dtype="float32")
    slow = counts_of(r.token_ids for r in naive.generate(PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, n=500,
                                                         progress=False, seed=25, **kw))
    keys = sorted(set(fast) | set(slow), key=lambda k: -(fast.get(k, 0) + slow.get(k, 0)))
    # merge rare states into one cell so expected counts are >= 5
    table, rest = [], [0, 0]
    for k in keys:
        f, s = fast.get(k, 0), slow.get(k, 0)
        if (f + s) * 500 / 2500 >= 5:
            table.append([f, s])
        else:
            rest[0] += f
            rest[1] += s
    if sum(rest):
        table.append(rest)
    p = chi2_contingency(np.array(table)).pvalue
    assert p > P_MIN, (p, table)


def test_distribution_with_triton_kernels(sampler, toy_dir, monkeypatch):
    """The same exactness check with the Triton kernels forced (interpreted on CPU)."""
    from powersample_fast import ops

    monkeypatch.setenv("POWERSAMPLE_FAST_BACKEND", "triton")
    assert ops.backend_for(torch.zeros(1)) == "triton"
    n, steps = 250, 2  # the interpreter costs ~0.1 s per decode step of 128 rows
    res = _run(sampler, n, mcmc_steps=steps, seed=26)
    chain = mh_chain_law(toy_dir, PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=steps,
                         eos_id=EOS)
    assert chi_square_pvalue(counts_of(r.token_ids for r in res), chain) > P_MIN
