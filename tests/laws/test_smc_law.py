"""The law of Power-SMC (engine/policies/smc.py) on the enumerable toys: the default toy (vocab 4,
EOS 3, prompt [0, 1], 4 new tokens) and the Markov EOS toy of laws/test_eos_law.py (EOS first half
the time: particles that end at step 1 keep their weight while the others run on).

Yardsticks. With R = Z_hat / Z (Z = sum_x p(x)^alpha, exact on a toy) and W(x) the normalised
weight the run puts on x, SMC gives E[R * W(x)] = pi(x) for every N (unbiasedness of the
unnormalised particle measure), while the returned sample has law E[W(x)]. Hence
    TV(law_N, pi) = sup_A |E[(1 - R) W(A)]| <= E[(1 - R)_+] = E|R - 1| / 2,
a bias bound measured from the same runs (mean of |R - 1| / 2 plus 3 standard errors). The
returned sample's TV to pi must stay below that bound plus the 99.9% quantile of the TV of as
many exact draws from pi. The exact statements (E[R] = 1, E[R 1(x_r = x)] = pi(x)) are z-tests at
4-4.5 standard errors, with resampling forced at almost every token (ess_threshold = 1).
"""
import math

import numpy as np
import pytest

import powersample_fast as pf
from helpers.laws import (ALPHA, EOS, P_MIN, PROMPT, T, chi_square_pvalue, counts_of, exact_power_law,
                          low_temperature_law, power_normaliser, proposal_law, sample_law, toy_tree, tv)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
MARKOV_PROMPT = [0]


def _sampler(d):
    model, _ = pf.load(d, device="cpu", dtype="float32")
    return pf.PowerSampler(model)


def _smc(d, prompt, N, n, seed, **kw):
    kw = dict(dict(method="smc", particles=N, alpha=ALPHA, max_new_tokens=T, n=n, seed=seed, progress=False,
                   max_batch=2048), **kw)
    return _sampler(d).generate(prompt, **kw)


def _ratios(res, d, prompt):
    return np.array([math.exp(r.extra["log_evidence"]) for r in res]) / power_normaliser(d, prompt, ALPHA, T, EOS)


def _bias_bound(R):
    """TV(law of the returned sample, pi) <= E|R - 1| / 2 (module doc), upper confidence value."""
    a = np.abs(R - 1.0)
    return 0.5 * (a.mean() + 3 * a.std(ddof=1) / math.sqrt(len(a)))


def _noise(law, n, seed=0):
    rng = np.random.default_rng(seed)
    return float(np.quantile([tv(law, sample_law(law, n, rng)) for _ in range(1000)], 0.999))


def test_one_particle_is_the_proposal(toy_dir):
    """N = 1 never resamples (ESS = N): the output is the proposal chain, exactly (chi-square), its
    log-probs are the exact fp64 values, and Z_hat = its importance weight."""
    res = _smc(toy_dir, PROMPT, 1, 3000, seed=31)
    law = proposal_law(toy_dir, PROMPT, 1.0 / ALPHA, T, EOS)
    assert chi_square_pvalue(counts_of(r.token_ids for r in res), law) > P_MIN
    assert all(r.extra["resampling_events"] == 0 for r in res)
    tree = toy_tree(toy_dir, PROMPT, T, EOS)
    for r in res[:100]:
        s = tuple(r.token_ids)
        np.testing.assert_allclose(r.logp, tree.token_logprobs(s), atol=1e-5)
        np.testing.assert_allclose(r.logq, tree.token_logprobs(s, 1.0 / ALPHA), atol=1e-5)
        assert r.extra["log_evidence"] == pytest.approx(ALPHA * sum(r.logp) - sum(r.logq), abs=1e-4)


def test_law_approaches_power_law_as_particles_grow(toy_dir):
    """N = 1, 4, 32 on the default toy (proposal temperature 0.5; with the default 1/alpha the
    EOS-first state, 15% of pi, is proposed so rarely that its weight reaches 212 and N must be in
    the hundreds): TV to pi decreases, the largest N lands within the bias bound plus noise, and the
    samples are far from the low-temperature law."""
    n = 2000
    pi = exact_power_law(toy_dir, PROMPT, ALPHA, T, EOS)
    low = low_temperature_law(toy_dir, PROMPT, ALPHA, T, EOS)
    tvs, bounds = [], []
    for N in (1, 4, 32):
        res = _smc(toy_dir, PROMPT, N, n, seed=40 + N, proposal_temperature=0.5)
        counts = counts_of(r.token_ids for r in res)
        tvs.append(tv(pi, counts))
        bounds.append(_bias_bound(_ratios(res, toy_dir, PROMPT)))
    noise = _noise(pi, n)
    assert tvs[0] > tvs[1] > tvs[2], (tvs, bounds)
    assert bounds[0] > bounds[2]
    assert tvs[2] < bounds[2] + noise, (tvs, bounds, noise)
    assert tv(low, pi) > 0.2
    assert chi_square_pvalue(counts, low) < 1e-6


def test_eos_toy_law(markov_dir):
    """The Markov EOS toy (a hot proposal, tau = 2, so weights vary): N = 1 is the proposal, N = 32
    lands within the bias bound plus noise of p^alpha, half of which sits on the EOS-first state."""
    n = 2000
    pi = exact_power_law(markov_dir, MARKOV_PROMPT, ALPHA, T, EOS)
    q = proposal_law(markov_dir, MARKOV_PROMPT, 2.0, T, EOS)
    one = counts_of(r.token_ids for r in _smc(markov_dir, MARKOV_PROMPT, 1, n, seed=51, proposal_temperature=2.0))
    assert chi_square_pvalue(one, q) > P_MIN
    res = _smc(markov_dir, MARKOV_PROMPT, 32, n, seed=52, proposal_temperature=2.0)
    counts = counts_of(r.token_ids for r in res)
    bound = _bias_bound(_ratios(res, markov_dir, MARKOV_PROMPT))
    assert tv(pi, counts) < bound + _noise(pi, n), (tv(pi, counts), bound)
    assert tv(pi, one) > tv(pi, counts) + 0.1
    assert counts[(EOS,)] / n > 0.45


@pytest.mark.parametrize("toy,tau,ramp", [("default", 0.5, 0), ("default", 0.5, 2), ("default", None, 0),
                                          ("markov", 2.0, 0), ("markov", 2.0, 10)],
                         ids=["default", "default-ramp2", "default-tau1/alpha", "markov", "markov-ramp10"])
def test_evidence_unbiased_and_weighted_law_exact(toy_dir, markov_dir, toy, tau, ramp):
    """Resampling at almost every token (ess_threshold = 1), N = 4: the mean of Z_hat matches Z, and
    the Z_hat-weighted law of the returned sample matches pi state by state, for every N and also
    with the exponent ramp (ramp 10 > T: every run ends inside the ramp and takes the final
    correction): the ramp leaves the target unchanged."""
    d, prompt = (toy_dir, PROMPT) if toy == "default" else (markov_dir, MARKOV_PROMPT)
    n = 2000
    res = _smc(d, prompt, 4, n, seed=60 + ramp, proposal_temperature=tau, ess_threshold=1.0, alpha_ramp_tokens=ramp)
    R = _ratios(res, d, prompt)
    assert abs(R.mean() - 1.0) < 4 * R.std(ddof=1) / math.sqrt(n), (R.mean(), R.std())
    assert np.mean([r.extra["resampling_events"] for r in res]) >= 1.0
    pi = exact_power_law(d, prompt, ALPHA, T, EOS)
    for s, p in pi.items():
        if p < 0.01:
            continue
        x = R * np.array([tuple(r.token_ids) == s for r in res])
        assert abs(x.mean() - p) < 4.5 * x.std(ddof=1) / math.sqrt(n), (s, x.mean(), p)
