"""Scalable Power Sampling, token level (policies/sps.py), on the default enumerable toy of tests/toy.py
(vocab 4, EOS 3, prompt [0, 1], 4 new tokens). Its law is computed independently of the sampler
(toy.sps_token_law: per prefix, the expectation of p^JK over simulated rollouts drawn from the exact
rollout laws), so the sampler is tested by chi-square against that law, and the law's computed
distance to p^alpha is the stated bias: with K = vocabulary, H to the end, M = 16 it is 0.0012 TV.
"""
import math

import numpy as np
import pytest
import torch

import powersample_fast as pf
from powersample_fast.errors import ConfigError
from powersample_fast.policies import sps as sps_mod
from powersample_fast.policies.sps import jackknife_probs
from toy import (ALPHA, EOS, P_MIN, PROMPT, T, chi_square_pvalue, counts_of, exact_power_law, low_temperature_law,
                 proposal_law, sample_law, sps_token_law, toy_tree, tv)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sampler(toy_dir):
    model, _ = pf.load(toy_dir, device="cpu", dtype="float32")
    return pf.PowerSampler(model)


def _sps(sampler, n, seed, K, M, H, **kw):
    return sampler.generate(PROMPT, method="sps", sps_top_k=K, sps_rollouts=M, sps_horizon=H, alpha=ALPHA,
                            max_new_tokens=T, n=n, seed=seed, progress=False, max_batch=2048, **kw)


def test_jackknife_matches_its_definition():
    rng = np.random.default_rng(0)
    K, M, a = 5, 6, 3.0
    lp = np.log(rng.dirichlet(np.ones(K)))
    f = rng.normal(-3, 2, size=(K, M))
    rolled = np.array([True, True, False, True, True])

    def probs(cols):
        lz = np.array([math.log(np.mean(np.exp((a - 1) * f[c, cols]))) if rolled[c] else 0.0 for c in range(K)])
        w = np.exp(a * lp + lz)
        return w / w.sum()

    want = M * probs(list(range(M))) - (M - 1) / M * sum(probs([r for r in range(M) if r != s]) for s in range(M))
    got, clipped = jackknife_probs(a, lp, f, rolled)
    if (want < 0).any():
        want = np.clip(want, 0, None)
        assert clipped
    np.testing.assert_allclose(got, want / want.sum(), rtol=1e-10)
    one, _ = jackknife_probs(a, lp, f[:, :1], rolled)  # M = 1: no jackknife
    w = np.exp(a * lp + np.where(rolled, (a - 1) * f[:, 0], 0.0))
    np.testing.assert_allclose(one, w / w.sum(), rtol=1e-10)


def test_no_horizon_is_the_low_temperature_top_k_law(sampler, toy_dir):
    """H = 0: zeta = 1 for every candidate, so SPS is low-temperature sampling over the top-K, exactly."""
    res = _sps(sampler, 3000, 71, K=2, M=4, H=0)
    law = proposal_law(toy_dir, PROMPT, 1.0 / ALPHA, T, EOS, top_k=2)
    assert chi_square_pvalue(counts_of(r.token_ids for r in res), law) > P_MIN
    assert all(r.extra["rollout_tokens"] == 0 for r in res)


@pytest.mark.slow
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


@pytest.fixture(scope="module")
def tiny_model(tiny):
    """The tiny random Llama of conftest (vocab 61, EOS 7)."""
    return tiny[0]


def test_rollouts_decode_on_the_right_kv(tiny_model, monkeypatch):
    """Every rollout's summed log p (what zeta is estimated from) equals a from-scratch forward of
    prompt + kept prefix + candidate + rollout, over many decisions (so the per-token delta forks of
    the prefix into the rollout rows are right), and the kept tokens' logp too."""
    checked = []
    orig = sps_mod.SPSPolicy._decide

    def spy(self, eng, g):
        st = g.state
        for s, (ci, r) in st.role.items():
            if st.rolled[ci]:
                toks = s.tokens  # [candidate, rollout tokens...]
                ctx = g.prompt + st.tokens + toks[:1]
                if len(toks) > 1:
                    z = tiny_model(torch.tensor([ctx + toks[1:-1]]))[0, len(ctx) - 1:].double()
                    want = torch.log_softmax(z, -1).gather(1, torch.tensor(toks[1:])[:, None]).sum().item()
                    assert st.f[ci, r] == pytest.approx(want, abs=5e-4)
                    checked.append(len(toks) - 1)
        return orig(self, eng, g)

    monkeypatch.setattr(sps_mod.SPSPolicy, "_decide", spy)
    s = pf.PowerSampler(tiny_model)
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    res = s.generate(prompts, method="sps", sps_top_k=3, sps_rollouts=2, sps_horizon=5, max_new_tokens=12, n=2,
                     seed=2, progress=False, max_batch=14)
    assert len(checked) > 50 and max(checked) == 5
    for r in res:
        z = tiny_model(torch.tensor([prompts[r.prompt_index] + r.token_ids]))[0, len(prompts[r.prompt_index]) - 1:-1]
        lp = torch.log_softmax(z.double(), -1).gather(1, torch.tensor(r.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(r.logp, dtype=torch.float64), lp, atol=2e-4)
        assert r.extra["decisions"] == len(r.token_ids)
    st = s.last_stats
    assert st["kv_copy_launches"] <= st["decode_steps"]


@pytest.mark.slow
def test_paper_defaults_run_on_the_default_model():
    """K = M = 8, H = 192 (budget-capped here) on SmolLM2-135M: it runs, results are well formed.
    Power-SMC with the paper's N = 64 likewise."""
    from powersample_fast import hub

    model, tok = pf.load(hub.default_model_dir(progress=False))
    s = pf.PowerSampler(model, tok)
    r = s.generate("2+2=", method="sps", max_new_tokens=4, seed=0, progress=False, chat=False)[0]
    assert 1 <= len(r.token_ids) <= 4 and r.method == "sps" and r.extra["rollout_tokens"] > 0
    assert s.last_stats["batch_slots"] == 65
    r = s.generate("2+2=", method="smc", max_new_tokens=4, seed=0, progress=False, chat=False)[0]
    assert 1 <= len(r.token_ids) <= 4 and r.method == "smc" and math.isfinite(r.extra["log_evidence"])
    assert s.last_stats["batch_slots"] == 64


@pytest.mark.parametrize("kw,match", [
    (dict(sps_top_k=0), r"sps_top_k \(K, sps candidates per token\) must be an integer >= 1 \(got 0\)"),
    (dict(sps_rollouts=0), r"sps_rollouts \(M, sps rollouts per candidate\) must be an integer >= 1 \(got 0\)"),
    (dict(sps_horizon=-1), r"sps_horizon \(H, sps rollout length\) must be an integer >= 0 \(got -1\)"),
    (dict(top_k=5), "top_k does not apply to method 'sps'"),
    (dict(method="beam"), "unknown method 'beam'; choose one of plain, mh, smc, sps"),
])
def test_bad_arguments(tiny_model, kw, match):
    kw = dict(dict(method="sps"), **kw)
    with pytest.raises(ConfigError, match=match):
        pf.PowerSampler(tiny_model).generate([[1, 2]], max_new_tokens=4, progress=False, **kw)
