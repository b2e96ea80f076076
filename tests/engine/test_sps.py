"""Scalable Power Sampling, token level (engine/policies/sps_token.py, `method="sps_token"`): the jackknife
against its definition, rollouts decoding on the right K/V, the paper's defaults on the default model,
argument errors. Its law on the enumerable toy: laws/test_sps_law.py."""
import math

import numpy as np
import pytest
import torch

import powersample_fast as pf
from powersample_fast.errors import ConfigError
from powersample_fast.engine.policies import sps_token as sps_mod
from powersample_fast.engine.policies.sps_token import jackknife_probs

pytestmark = pytest.mark.usefixtures("one_thread")


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
    res = s.generate(prompts, method="sps_token", sps_top_k=3, sps_rollouts=2, sps_horizon=5, max_new_tokens=12, n=2,
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
    from powersample_fast.models import default_model as hub

    model, tok = pf.load(hub.default_model_dir(progress=False))
    s = pf.PowerSampler(model, tok)
    r = s.generate("2+2=", method="sps_token", max_new_tokens=4, seed=0, progress=False, chat=False)[0]
    assert 1 <= len(r.token_ids) <= 4 and r.method == "sps_token" and r.extra["rollout_tokens"] > 0
    assert s.last_stats["batch_slots"] == 65
    r = s.generate("2+2=", method="smc", max_new_tokens=4, seed=0, progress=False, chat=False)[0]
    assert 1 <= len(r.token_ids) <= 4 and r.method == "smc" and math.isfinite(r.extra["log_evidence"])
    assert s.last_stats["batch_slots"] == 64


@pytest.mark.parametrize("kw,match", [
    (dict(sps_top_k=0), r"sps_top_k \(K, sps candidates per block or token\) must be an integer >= 1 \(got 0\)"),
    (dict(sps_rollouts=0), r"sps_rollouts \(M, sps rollouts per candidate\) must be an integer >= 1 \(got 0\)"),
    (dict(sps_horizon=-1), r"sps_horizon \(H, sps rollout length\) must be an integer >= 0 \(got -1\)"),
    (dict(top_k=5), "top_k does not apply to method 'sps_token'"),
    (dict(method="beam"), "unknown method 'beam'; choose one of plain, mh, smc, sps, sps_token"),
])
def test_bad_arguments(tiny_model, kw, match):
    kw = dict(dict(method="sps_token"), **kw)
    with pytest.raises(ConfigError, match=match):
        pf.PowerSampler(tiny_model).generate([[1, 2]], max_new_tokens=4, progress=False, **kw)
