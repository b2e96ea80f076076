"""The naive baseline (HF generate per proposal) against the exact laws of the toy model.

Toy: vocab 4, EOS 3, prompt [0, 1], max_new_tokens 4, block_size 2 (121 final states). Bounds are
from sampling noise: chi-square p-values against exact laws (mh_chain_law gives the exact law of
Algorithm 1 after N steps), and TV to pi within 2x the median TV of the same number of exact draws,
plus the computed distance between the N-step law and pi.
"""

import numpy as np
import pytest

from powersample_fast.naive import NaiveSampler
from helpers.laws import (
    chi_square_pvalue,
    counts_of,
    exact_power_law,
    load_toy_model,
    low_temperature_law,
    mh_chain_law,
    proposal_law,
    toy_tree,
    tv,
    tv_noise_reference,
)

from helpers.laws import ALPHA, B, EOS, P_MIN, PROMPT, T


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def sampler(toy_dir):
    # explicit CPU/fp32: a path loads on CUDA in bf16 by default, and these tests compare fp32 lp/lq
    return NaiveSampler(toy_dir, device="cpu", dtype="float32")


def _run(sampler, n, **kw):
    kw = {"alpha": ALPHA, "max_new_tokens": T, "block_size": B, "n": n, "progress": False, **kw}
    return sampler.generate(PROMPT, **kw)


def _check_token_logprobs(toy_dir, results, tau, top_k=None, eos=EOS):
    """lp/lq returned per token equal the exact (fp64 full-forward) values."""
    tree = toy_tree(toy_dir, PROMPT, T, eos)
    for r in results[:200]:
        s = tuple(r.token_ids)
        np.testing.assert_allclose(r.logp, tree.token_logprobs(s), atol=1e-5)
        np.testing.assert_allclose(r.logq, tree.token_logprobs(s, tau, top_k), atol=1e-5)
        assert r.finished_by_eos == (s[-1] in tree.eos)


@pytest.mark.parametrize(
    "tau,top_k,eos,n",
    [(None, None, [EOS], 3000), (1.0, 2, [EOS], 1500), (1.0, None, [2, EOS], 1500)],
    ids=["default-tau", "top-k", "two-eos"],
)
def test_no_mcmc_is_the_proposal_chain(sampler, toy_dir, tau, top_k, eos, n):
    s = sampler if eos == [EOS] else NaiveSampler(sampler.model, eos_token_ids=eos)
    res = s.generate(PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, n=n, progress=False,
                     mcmc_steps=0, proposal_temperature=tau, top_k=top_k, seed=11)
    tau_ = tau if tau is not None else 1.0 / ALPHA
    law = proposal_law(toy_dir, PROMPT, tau_, T, eos, top_k=top_k)
    assert chi_square_pvalue(counts_of(r.token_ids for r in res), law) > P_MIN
    _check_token_logprobs(toy_dir, res, tau_, top_k, eos)
    assert all(r.proposed == 0 and r.accepted == 0 for r in res)


def test_converges_to_power_law(sampler, toy_dir):
    n, steps = 800, 12
    res = _run(sampler, n, mcmc_steps=steps, proposal_temperature=1.0, seed=12)
    counts = counts_of(r.token_ids for r in res)
    pi = exact_power_law(toy_dir, PROMPT, ALPHA, T, EOS)
    low = low_temperature_law(toy_dir, PROMPT, ALPHA, T, EOS)
    chain = mh_chain_law(toy_dir, PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=steps,
                         eos_id=EOS, proposal_temperature=1.0)
    # exact: the law of Algorithm 1 after `steps` steps
    assert chi_square_pvalue(counts, chain) > P_MIN
    # near pi: sampling noise of n exact draws + the (computed) distance of the N-step law to pi
    noise = tv_noise_reference(pi, n, np.random.default_rng(0))
    bound = 2.0 * noise + tv(chain, pi)
    assert tv(pi, counts) < bound, (tv(pi, counts), noise, tv(chain, pi))
    # and clearly not the low-temperature law (triangle inequality: TV(low, emp) >= TV(low, pi) - bound)
    assert tv(low, pi) - bound > 0.1
    assert chi_square_pvalue(counts, low) < 1e-6  # and the samples are not from the low-temperature law
    _check_token_logprobs(toy_dir, res, 1.0)


@pytest.mark.parametrize("index,tau", [("uniform", None), ("last_block", 1.0)])
def test_few_steps_exact_law(sampler, toy_dir, index, tau):
    """Default tau = 1/alpha (lq != lp, index term active) and last_block mode, 3 steps: chi-square
    against the exact 3-step law of Algorithm 1, far from the proposal chain's law."""
    n, steps = 800, 3
    res = _run(sampler, n, mcmc_steps=steps, proposal_temperature=tau, index=index, seed=13)
    counts = counts_of(r.token_ids for r in res)
    chain = mh_chain_law(toy_dir, PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=steps,
                         eos_id=EOS, proposal_temperature=tau, index=index)
    prop = proposal_law(toy_dir, PROMPT, tau or 1.0 / ALPHA, T, EOS)
    assert chi_square_pvalue(counts, chain) > P_MIN
    assert chi_square_pvalue(counts, prop) < 1e-6
    assert 0 < sum(r.accepted for r in res) < sum(r.proposed for r in res)


def test_checkpoint_generation_defaults_do_not_leak(toy_dir):
    model = load_toy_model(toy_dir)
    model.generation_config.top_k = 1
    model.generation_config.suppress_tokens = [0, 1, 2]
    model.generation_config.repetition_penalty = 50.0
    saved = model.generation_config
    s = NaiveSampler(model)
    res = s.generate(PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=0,
                     proposal_temperature=1.0, n=400, seed=21, progress=False)
    law = proposal_law(toy_dir, PROMPT, 1.0, T, EOS)
    assert chi_square_pvalue(counts_of(r.token_ids for r in res), law) > P_MIN
    assert model.generation_config is saved and saved.top_k == 1
