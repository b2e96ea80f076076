"""Power-SMC (engine/policies/smc.py) mechanics: systematic resampling, the exponent schedule, K/V
copied on resampling (both backends), batch independence, argument errors and the CLI flags. Its
law on the enumerable toys: laws/test_smc_law.py."""
import numpy as np
import pytest
import torch

import powersample_fast as pf
from powersample_fast.engine import Engine
from powersample_fast.errors import ConfigError
from powersample_fast.sampling_params import SamplingParams
from powersample_fast.engine.policies.smc import exponent, systematic

pytestmark = pytest.mark.usefixtures("one_thread")


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


@pytest.fixture(scope="module")
def tiny_model(tiny):
    """The tiny random Llama of conftest (vocab 61, EOS 7)."""
    return tiny[0]


def _recompute(model, prompt, tokens, tau):
    z = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].double()
    t = torch.tensor(tokens)[:, None]
    return torch.log_softmax(z, -1).gather(1, t)[:, 0], torch.log_softmax(z / tau, -1).gather(1, t)[:, 0]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])  # interpreted: ~4 s
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
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The CLI's tiny model + tokenizer (helpers.tiny_models.make_cli_model_dir)."""
    from helpers.tiny_models import make_cli_model_dir

    return make_cli_model_dir(tmp_path_factory.mktemp("cli_model"))


@pytest.mark.parametrize("method,flags,key", [
    ("smc", ["--particles", "3", "--ess-threshold", "1.0", "--alpha-ramp-tokens", "2", "--return-all"], "log_evidence"),
    ("sps", ["--sps-top-k", "2", "--sps-rollouts", "2", "--sps-horizon", "3"], "rollout_tokens"),
])
def test_cli_method_json(model_dir, capsys, method, flags, key):
    import json

    from powersample_fast.entrypoints.cli import main as cli

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
def test_cli_method_errors(model_dir, capsys, args, match):
    from powersample_fast.entrypoints.cli import main as cli

    rc = cli.main(["sample", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4", "--no-progress"] + args)
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err


def test_cli_method_flags_reach_generate(model_dir, monkeypatch):
    from powersample_fast.entrypoints.cli import main as cli
    from powersample_fast import api as smod

    seen = {}
    monkeypatch.setattr(smod.PowerSampler, "generate", lambda self, prompts, **kw: seen.update(kw) or [])
    cli.main(["sample", "--model", str(model_dir), "--prompt", "a", "--method", "smc", "--particles", "5",
              "--ess-threshold", "0.3", "--resample-every", "2", "--alpha-ramp-tokens", "7", "--return-all",
              "--sps-top-k", "3", "--sps-rollouts", "4", "--sps-horizon", "9", "--max-new-tokens", "8", "--no-progress"])
    assert {k: seen[k] for k in ("method", "particles", "ess_threshold", "resample_every", "alpha_ramp_tokens",
                                 "return_all", "sps_top_k", "sps_rollouts", "sps_horizon")} == dict(
        method="smc", particles=5, ess_threshold=0.3, resample_every=2, alpha_ramp_tokens=7, return_all=True,
        sps_top_k=3, sps_rollouts=4, sps_horizon=9)
