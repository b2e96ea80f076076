"""The law of Scalable Power Sampling, token level (engine/policies/sps_token.py, `method="sps_token"`), on
the default enumerable toy (vocab 4, EOS 3, prompt [0, 1], 4 new tokens). Its law is computed
independently of the sampler (helpers.laws.sps_token_law: per prefix, the expectation of p^JK over
simulated rollouts drawn from the exact rollout laws), so the sampler is tested by chi-square against
that law, and the law's computed distance to p^alpha is the stated bias: with K = vocabulary, H to the
end, M = 16 it is 0.0012 TV.
"""
import numpy as np
import pytest

import powersample_fast as pf
from helpers.laws import (ALPHA, EOS, P_MIN, PROMPT, T, chi_square_pvalue, counts_of, exact_power_law,
                          low_temperature_law, proposal_law, sample_law, sps_token_law, toy_tree, tv)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def sampler(toy_dir):
    model, _ = pf.load(toy_dir, device="cpu", dtype="float32")
    return pf.PowerSampler(model)


def _sps(sampler, n, seed, K, M, H, **kw):
    return sampler.generate(PROMPT, method="sps_token", sps_top_k=K, sps_rollouts=M, sps_horizon=H, alpha=ALPHA,
                            max_new_tokens=T, n=n, seed=seed, progress=False, max_batch=2048, **kw)


def test_no_horizon_is_the_low_temperature_top_k_law(sampler, toy_dir):
    """H = 0: zeta = 1 for every candidate, so SPS is low-temperature sampling over the top-K, exactly."""
    res = _sps(sampler, 3000, 71, K=2, M=4, H=0)
    law = proposal_law(toy_dir, PROMPT, 1.0 / ALPHA, T, EOS, top_k=2)
    assert chi_square_pvalue(counts_of(r.token_ids for r in res), law) > P_MIN
    assert all(r.extra["rollout_tokens"] == 0 for r in res)


def test_approaches_power_law(sampler, toy_dir):
    """K = vocabulary, H = budget, M = 16: the samples follow the computed SPS law (chi-square), which is
    0.0012 TV from p^alpha; the TV to p^alpha is within that plus sampling noise, and far from the
    low-temperature law. Per-token logp are exact; logq is log p^JK of the chosen token."""
    n, K, M, H = 2000, 4, 16, T
    res = _sps(sampler, n, 72, K, M, H)
    counts = counts_of(r.token_ids for r in res)
    law = sps_token_law(toy_dir, PROMPT, alpha=ALPHA, max_new_tokens=T, eos_id=EOS, top_k=K, rollouts=M, horizon=H)
    pi = exact_power_law(toy_dir, PROMPT, ALPHA, T, EOS)
    low = low_temperature_law(toy_dir, PROMPT, ALPHA, T, EOS)
    assert chi_square_pvalue(counts, law) > P_MIN
    bias = tv(law, pi)
    assert bias < 0.005
    rng = np.random.default_rng(0)
    noise = float(np.quantile([tv(pi, sample_law(law, n, rng)) for _ in range(1000)], 0.999))
    assert tv(pi, counts) < noise, (tv(pi, counts), noise, bias)  # the quantile includes the bias
    assert chi_square_pvalue(counts, low) < 1e-6
    tree = toy_tree(toy_dir, PROMPT, T, EOS)
    for r in res[:50]:
        np.testing.assert_allclose(r.logp, tree.token_logprobs(tuple(r.token_ids)), atol=1e-5)
        assert all(q <= 1e-9 for q in r.logq)
    # the bias is the estimator's: M = 1 (no jackknife, one rollout) is far from p^alpha
    far = sps_token_law(toy_dir, PROMPT, alpha=ALPHA, max_new_tokens=T, eos_id=EOS, top_k=K, rollouts=1, horizon=H)
    assert tv(far, pi) > 0.2
