"""Exact laws of the MH mixing options (issue 22): index="entropy" and mh_tries=k pass the tests
Algorithm 1 passes (tests/laws/test_mh_law.py, test_eos_law.py) on the default toy and on the Markov
EOS toy (the `markov_dir` fixture): chi-square against the computed n-step law of the variant
(helpers/toy_mixing.py: transition matrices computed independently of the sampler) and TV to
p^alpha within sampling noise after many steps. Deliberately wrong variants (the entropy cut without
its log W(x) - log W(x') term; multiple tries without the reference set) are patched into the
sampler's arithmetic (engine/policies/mh_mixing.py) and must fail the same tests. 3000 chains each:
slow."""
import numpy as np
import pytest

import powersample_fast as pf
from powersample_fast.engine.policies import mh_mixing as mix
from helpers.laws import (ALPHA, B, EOS, P_MIN, PROMPT, T, chi_square_pvalue, counts_of, exact_power_law,
                          proposal_law, sample_law, tv)
from helpers.toy_mixing import mixing_chain_law

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

EOS_PROMPT = [0]  # the Markov EOS toy: first token EOS half the time, near-deterministic continuations


@pytest.fixture(scope="module")
def toy_sampler(toy_dir):
    model, _ = pf.load(toy_dir, device="cpu", dtype="float32")
    return pf.PowerSampler(model)


@pytest.fixture(scope="module")
def markov_sampler(markov_dir):
    model, _ = pf.load(markov_dir, device="cpu", dtype="float32")
    return pf.PowerSampler(model)


def _gen(sampler, prompt, n, **kw):
    kw = {"alpha": ALPHA, "max_new_tokens": T, "block_size": B, "n": n, "progress": False, "max_batch": 128, **kw}
    return sampler.generate(prompt, **kw)


def _law(model_dir, prompt, steps, tau, **kw):
    return mixing_chain_law(model_dir, prompt, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=steps,
                            eos_id=EOS, proposal_temperature=tau, **kw)


def _bound(target, chain_law, n, seed=0):
    """99.9% quantile of TV(target, n exact draws of chain_law): sampling noise + the computed gap."""
    rng = np.random.default_rng(seed)
    return float(np.quantile([tv(target, sample_law(chain_law, n, rng)) for _ in range(1000)], 0.999))


def _law_kw(kw):
    """Sampler keywords -> mixing_chain_law keywords."""
    return {"tries" if k == "mh_tries" else k: v for k, v in kw.items()}


@pytest.mark.parametrize("kw,tau", [(dict(index="entropy"), 1.0), (dict(mh_tries=2), 1.0),
                                    (dict(mh_tries=2, index="entropy", entropy_eps=0.01, entropy_beta=2.0), None)],
                         ids=["entropy", "tries2", "tries2-entropy-default-tau"])
def test_few_steps_exact_law_default_toy(toy_sampler, toy_dir, kw, tau):
    """3 MH steps per stage: chi-square against the computed 3-step law of the variant; far from the
    proposal chain's law."""
    n, steps = 3000, 3
    res = _gen(toy_sampler, PROMPT, n, mcmc_steps=steps, proposal_temperature=tau, seed=31, **kw)
    counts = counts_of(r.token_ids for r in res)
    law = _law(toy_dir, PROMPT, steps, tau, **_law_kw(kw))
    assert chi_square_pvalue(counts, law) > P_MIN
    assert chi_square_pvalue(counts, proposal_law(toy_dir, PROMPT, tau or 1.0 / ALPHA, T, EOS)) < 1e-6
    assert 0 < sum(r.accepted for r in res) < sum(r.proposed for r in res)


@pytest.mark.parametrize("kw", [dict(index="entropy"), dict(mh_tries=2)], ids=["entropy", "tries2"])
def test_converges_to_power_law_default_toy(toy_sampler, toy_dir, kw):
    """12 steps, tau = 1: chi-square against the 12-step law and TV to p^alpha within the noise bound."""
    n, steps = 3000, 12
    res = _gen(toy_sampler, PROMPT, n, mcmc_steps=steps, proposal_temperature=1.0, seed=32, **kw)
    counts = counts_of(r.token_ids for r in res)
    pi = exact_power_law(toy_dir, PROMPT, ALPHA, T, EOS)
    law = _law(toy_dir, PROMPT, steps, 1.0, **_law_kw(kw))
    assert chi_square_pvalue(counts, law) > P_MIN
    assert tv(pi, counts) < _bound(pi, law, n), (tv(pi, counts), tv(law, pi))


@pytest.mark.parametrize("kw", [dict(index="entropy"), dict(mh_tries=2), dict(mh_tries=3, index="entropy")],
                         ids=["entropy", "tries2", "tries3-entropy"])
def test_eos_toy_exact(markov_sampler, markov_dir, kw):
    """The EOS toy (jumps to the final stage): chi-square against the computed law, TV to p^alpha
    within noise."""
    n, steps = 3000, 6
    res = _gen(markov_sampler, EOS_PROMPT, n, mcmc_steps=steps, proposal_temperature=1.0, seed=33, **kw)
    counts = counts_of(r.token_ids for r in res)
    pi = exact_power_law(markov_dir, EOS_PROMPT, ALPHA, T, EOS)
    law = _law(markov_dir, EOS_PROMPT, steps, 1.0, **_law_kw(kw))
    assert chi_square_pvalue(counts, law) > P_MIN
    assert tv(pi, counts) < _bound(pi, law, n), (tv(pi, counts), tv(law, pi))
    assert any(r.extra["jumped_to_final_stage"] for r in res)


def _no_index_term(W_x, W_y):
    return 0.0


def _no_references(log_w_tries, log_w_refs, log_w_x):
    return mix.logsumexp(log_w_tries) - log_w_x


@pytest.mark.parametrize("kw,patch,wrong", [
    (dict(index="entropy"), ("index_term", _no_index_term), dict(index_term=False)),
    (dict(mh_tries=2), ("mtm_log_accept", _no_references), dict(references=False)),
], ids=["entropy-without-W-term", "tries-without-references"])
def test_wrong_variants_are_rejected(markov_sampler, markov_dir, monkeypatch, kw, patch, wrong):
    """The same test on the EOS toy rejects each deliberately wrong rule, and the samples follow the
    wrong rule's own computed law (so the test has the power to see the missing term)."""
    n, steps = 3000, 6
    monkeypatch.setattr(mix, *patch)
    res = _gen(markov_sampler, EOS_PROMPT, n, mcmc_steps=steps, proposal_temperature=1.0, seed=34, **kw)
    counts = counts_of(r.token_ids for r in res)
    pi = exact_power_law(markov_dir, EOS_PROMPT, ALPHA, T, EOS)
    right = _law(markov_dir, EOS_PROMPT, steps, 1.0, **_law_kw(kw))
    assert chi_square_pvalue(counts, right) < 1e-6
    assert tv(pi, counts) > _bound(pi, right, n)
    assert chi_square_pvalue(counts, _law(markov_dir, EOS_PROMPT, steps, 1.0, **_law_kw(kw), **wrong)) > P_MIN
