"""Power-SMC (policies/smc.py) on the enumerable toys of tests/toy.py: the default toy (vocab 4, EOS 3,
prompt [0, 1], 4 new tokens) and the Markov EOS toy of tests/test_eos_exact.py (EOS first half the
time: particles that end at step 1 keep their weight while the others run on).

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
import torch

import powersample_fast as pf
from powersample_fast.engine import Engine
from powersample_fast.errors import ConfigError
from powersample_fast.params import SamplingParams
from powersample_fast.policies.smc import exponent, systematic
from test_eos_exact import TABLE
from toy import (ALPHA, EOS, P_MIN, PROMPT, T, chi_square_pvalue, counts_of, exact_power_law, low_temperature_law,
                 make_markov_model_dir, power_normaliser, proposal_law, sample_law, toy_tree, tv)

pytestmark = pytest.mark.usefixtures("one_thread")
MARKOV_PROMPT = [0]


@pytest.fixture(scope="module")
def markov_dir(tmp_path_factory):
    return make_markov_model_dir(tmp_path_factory.mktemp("markov"), TABLE, EOS)


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


def test_systematic_resampling_counts():
    W = np.array([0.5, 0.25, 0.125, 0.125])
    for u in (0.0, 0.3, 0.999):
        anc = systematic(W, u)
        counts = np.bincount(anc, minlength=4)
        assert counts.sum() == 4 and np.all(np.abs(counts - 4 * W) < 1)  # systematic: |count - N W| < 1
        assert np.all(np.diff(anc) >= 0)


def test_exponent_schedule():
    p = SamplingParams(method="smc", alpha=4.0, alpha_ramp_tokens=3)
    assert [exponent(p, t) for t in range(5)] == [1.0, 2.0, 3.0, 4.0, 4.0]
    assert exponent(SamplingParams(method="smc", alpha=4.0), 7) == 4.0


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


@pytest.fixture(scope="module")
def tiny_model(tiny):
    """The tiny random Llama of conftest (vocab 61, EOS 7)."""
    return tiny[0]


def _recompute(model, prompt, tokens, tau):
    z = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].double()
    t = torch.tensor(tokens)[:, None]
    return torch.log_softmax(z, -1).gather(1, t)[:, 0], torch.log_softmax(z / tau, -1).gather(1, t)[:, 0]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_resampling_copies_kv(tiny_model, backend, monkeypatch):
    """After resampling events every particle's logp/logq equal a from-scratch forward of its tokens
    (children decode on their parent's forked K/V), the K/V copies of a step are one launch, children
    sample their own futures, and weights are normalised. Triton: the kv_copy_ kernel, interpreted."""
    from powersample_fast import ops

    monkeypatch.setenv("POWERSAMPLE_FAST_BACKEND", backend)
    assert ops.backend_for(torch.zeros(1)) == backend
    s = pf.PowerSampler(tiny_model)
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    T_ = 24 if backend == "torch" else 8
    res = s.generate(prompts, method="smc", particles=6, ess_threshold=1.0, alpha=4.0, max_new_tokens=T_, n=2,
                     seed=3, progress=False, max_batch=12, return_all=True)
    assert sum(r.extra["resampling_events"] for r in res) >= 4
    st = s.last_stats
    assert st["kv_copy_launches"] <= st["decode_steps"]  # one launch per step at most (no loop per layer/row)
    for r in res:
        ps = r.extra["particles"]
        assert sum(p["weight"] for p in ps) == pytest.approx(1.0)
        assert ps[r.extra["particle_index"]]["token_ids"] == r.token_ids
        assert len({tuple(p["token_ids"]) for p in ps}) > 1  # children did not copy their parent's future
        for p in ps + [dict(token_ids=r.token_ids, logp=r.logp, logq=r.logq)]:
            toks = p["token_ids"]
            assert 1 <= len(toks) <= T_ and 7 not in toks[:-1]
            lp, lq = _recompute(tiny_model, prompts[r.prompt_index], toks, 0.25)
            assert torch.allclose(torch.tensor(p["logp"], dtype=torch.float64), lp, atol=2e-4)
            assert torch.allclose(torch.tensor(p["logq"], dtype=torch.float64), lq, atol=2e-4)


def test_batch_composition_independence(tiny_model):
    """A run's particles share one group: its result does not depend on the other groups in the batch."""
    kw = dict(method="smc", particles=4, ess_threshold=0.9, alpha=3.0, max_new_tokens=16, n=3, seed=11,
              progress=False)
    a = pf.PowerSampler(tiny_model).generate([[1, 2, 3], [4, 5]], max_batch=4, **kw)
    b = pf.PowerSampler(tiny_model).generate([[1, 2, 3], [4, 5]], max_batch=24, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.extra["log_evidence"] for r in a] == pytest.approx([r.extra["log_evidence"] for r in b], abs=1e-5)
    assert [len(r.extra["ess_trace"]) for r in a] == [len(r.extra["ess_trace"]) for r in b]


@pytest.mark.parametrize("kw,match", [
    (dict(particles=0), r"particles \(N, smc particles per sample\) must be an integer >= 1 \(got 0\)"),
    (dict(ess_threshold=0.0), r"ess_threshold must be in \(0, 1\] \(got 0.0\)"),
    (dict(ess_threshold=1.5), r"ess_threshold must be in \(0, 1\] \(got 1.5\)"),
    (dict(resample_every=0), "resample_every"),
    (dict(alpha_ramp_tokens=-1), "alpha_ramp_tokens"),
    (dict(return_all=1), "return_all"),
])
def test_bad_arguments(tiny_model, kw, match):
    with pytest.raises(ConfigError, match=match):
        pf.PowerSampler(tiny_model).generate([[1, 2]], method="smc", max_new_tokens=4, progress=False, **kw)


def test_engine_too_small_for_the_particles(tiny_model):
    eng = Engine(tiny_model, max_batch=4, max_len=16, store_rows=0)
    with pytest.raises(ConfigError, match="needs 8 decode and 0 store rows"):
        eng.add_request([1, 2], SamplingParams(method="smc", particles=8, max_new_tokens=4))


# ---------------------------------------------------------------------------------------------- CLI
from test_cli import model_dir  # noqa: E402,F401  (tiny_model model + tokenizer fixture)


@pytest.mark.parametrize("method,flags,key", [
    ("smc", ["--particles", "3", "--ess-threshold", "1.0", "--alpha-ramp-tokens", "2", "--return-all"], "log_evidence"),
    ("sps", ["--sps-top-k", "2", "--sps-rollouts", "2", "--sps-horizon", "3"], "rollout_tokens"),
])
def test_cli_method_json(model_dir, capsys, method, flags, key):  # noqa: F811
    import json

    from powersample_fast import cli

    rc = cli.main(["sample", "--model", str(model_dir), "--prompt", "hello", "--method", method, "--max-new-tokens",
                   "6", "--seed", "0", "--n", "2", "--json", "--no-progress"] + flags)
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(rows) == 2 and all(r["method"] == method and key in r["extra"] for r in rows)
    if method == "smc":
        assert all(len(r["extra"]["particles"]) == 3 and len(r["extra"]["ess_trace"]) >= 1 for r in rows)
    rc = cli.main(["sample", "--model", str(model_dir), "--prompt", "hi", "--method", method, "--max-new-tokens", "4",
                   "--seed", "0", "--no-progress"] + flags)
    out = capsys.readouterr().out
    assert rc == 0 and (("log-evidence" in out) if method == "smc" else ("rollout tokens" in out))


@pytest.mark.parametrize("args,match", [(["--method", "smc", "--particles", "0"], "particles"),
                                        (["--method", "smc", "--ess-threshold", "2"], "ess_threshold must be in (0, 1]"),
                                        (["--method", "sps", "--sps-rollouts", "0"], "sps_rollouts"),
                                        (["--method", "sps", "--sps-horizon", "-1"], "sps_horizon")])
def test_cli_method_errors(model_dir, capsys, args, match):  # noqa: F811
    from powersample_fast import cli

    rc = cli.main(["sample", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4", "--no-progress"] + args)
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err


def test_cli_method_flags_reach_generate(model_dir, monkeypatch):  # noqa: F811
    from powersample_fast import cli
    from powersample_fast import sampler as smod

    seen = {}
    monkeypatch.setattr(smod.PowerSampler, "generate", lambda self, prompts, **kw: seen.update(kw) or [])
    cli.main(["sample", "--model", str(model_dir), "--prompt", "a", "--method", "smc", "--particles", "5",
              "--ess-threshold", "0.3", "--resample-every", "2", "--alpha-ramp-tokens", "7", "--return-all",
              "--sps-top-k", "3", "--sps-rollouts", "4", "--sps-horizon", "9", "--max-new-tokens", "8", "--no-progress"])
    assert {k: seen[k] for k in ("method", "particles", "ess_threshold", "resample_every", "alpha_ramp_tokens",
                                 "return_all", "sps_top_k", "sps_rollouts", "sps_horizon")} == dict(
        method="smc", particles=5, ess_threshold=0.3, resample_every=2, alpha_ramp_tokens=7, return_all=True,
        sps_top_k=3, sps_rollouts=4, sps_horizon=9)
