"""Issue 19: bounded work in the API and `sample` (n, mcmc_steps: memory check, 1e9-token cap with
allow_long / --allow-long, 24 h expected-time cap), and one-line errors for bad input (undecodable
--prompt bytes, lone surrogates, tiny temperatures, --threads 10000)."""
import itertools
import time

import pytest
import torch

from powersample_fast.entrypoints import work_limits
from powersample_fast.entrypoints.cli import main as cli, output as cli_output, startup as cli_setup
from powersample_fast.models import loader as loader_mod
from powersample_fast.errors import ConfigError
from powersample_fast.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
GiB = 2 ** 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers.tiny_models import make_cli_model_dir

    return make_cli_model_dir(tmp_path_factory.mktemp("cli_limits"))


@pytest.fixture
def memory_8g(monkeypatch):
    """The memory check against a fixed 8 GiB, whatever this machine has free."""
    monkeypatch.setattr(work_limits, "available_memory", lambda: 8 * GiB)


@pytest.fixture
def keep_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _no_load(monkeypatch):
    monkeypatch.setattr(loader_mod, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def _spy_generate(monkeypatch):
    from powersample_fast import api as smod

    seen = {}

    def fake(self, prompts, **kw):
        seen.update(kw, threads=torch.get_num_threads())
        return []

    monkeypatch.setattr(smod.PowerSampler, "generate", fake)
    return seen


def _sample(model_dir, *extra):
    return cli.main(["sample", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "6",
                     "--block-size", "3", "--steps", "1", "--no-progress", "--seed", "0", *extra])


def _one_line(capsys):
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if not x.startswith("powersample-fast: note:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- the API
def test_planned_tokens_closed_form_matches_the_policies():
    from powersample_fast.engine.policies import get_policy

    for m, T, B, N, idx in itertools.product(["mh", "plain", "smc", "sps", "sps_token"], [1, 7, 64, 100],
                                             [1, 3, 64, 200], [0, 1, 10], ["uniform", "last_block"]):
        p = SamplingParams(method=m, max_new_tokens=T, block_size=B, mcmc_steps=N, index=idx, particles=3)
        assert work_limits.planned_tokens_per_chain(p) == pytest.approx(get_policy(m).planned_tokens(p))
        assert work_limits.decode_rows(p) == get_policy(m).rows(p)[0]
    for m, T, B, H, L in itertools.product(["sps", "sps_token"], [1, 7, 64, 100], [1, 3, 64, 200], [0, 1, 5, 64],
                                           [8, 70]):  # rollouts shorter than the budget left, rows L or K*M
        p = SamplingParams(method=m, max_new_tokens=T, block_size=B, sps_horizon=H, sps_candidates=L)
        assert work_limits.planned_tokens_per_chain(p) == pytest.approx(get_policy(m).planned_tokens(p))
        assert work_limits.decode_rows(p) == get_policy(m).rows(p)[0]


@pytest.mark.parametrize("method,extra", [
    ("plain", {}), ("mh", {"block_size": 8, "mcmc_steps": 2}), ("mh", {"block_size": 8, "mcmc_steps": 2, "mh_tries": 2}),
    ("smc", {"particles": 4}), ("sps", {"block_size": 8, "sps_candidates": 6, "sps_top_k": 2, "sps_rollouts": 2,
                                       "sps_horizon": 5}),
    ("sps_token", {"sps_top_k": 2, "sps_rollouts": 2, "sps_horizon": 3})])
def test_expected_decode_steps_and_rows_are_the_engines(tiny, method, extra):
    """The start line's estimate (CLI `sample`): the decode steps and rows per step a run takes with EOS
    off, as the engine counts them, for every method (smc's particles and sps's rows decode together:
    they are not steps); mh's proposals cut at random, so its count is the mean (within 30%)."""
    import powersample_fast as pf

    p = SamplingParams(method=method, max_new_tokens=24, n=2, seed=1, **extra)
    expect = cli_output.expected_decode_steps(p, 2, 8)
    rows, together = work_limits.step_rows(p, 2, 8)
    sampler = pf.PowerSampler(tiny[0], eos_token_ids=[])
    sampler.generate([[1, 2, 3]], progress=False, max_batch=8, method=method, max_new_tokens=24, n=2, seed=1, **extra)
    stats = sampler.last_stats
    assert stats["batch_slots"] == rows and together == rows // work_limits.decode_rows(p)
    if method == "mh":
        assert abs(stats["decode_steps"] - expect) <= 0.3 * expect
    else:
        assert stats["decode_steps"] == expect


def test_generate_bounds_n_and_mcmc_steps(model_dir, memory_8g):
    from powersample_fast import PowerSampler, load

    s = PowerSampler(*load(model_dir, device="cpu", dtype=torch.float32))
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=r"1,000,000,000 chains .* need at least 715 GiB of memory .* 8 GiB "
                                          r"available; lower n$"):
        s.generate([1, 2, 3], n=10 ** 9, progress=False, allow_long=True)  # memory: no override
    with pytest.raises(ConfigError, match=r"plans 1\.31e\+13 decode tokens .*mcmc_steps=1,000,000,000\), over the "
                                          r"limit of 1e\+09; .* or pass allow_long=True to run it anyway"):
        s.generate([1, 2, 3], mcmc_steps=10 ** 9, progress=False)
    with pytest.raises(ConfigError, match="2 prompts x n=10,000,000.*split the prompts"):
        s.generate([[1, 2], [3]], n=10 ** 7, max_new_tokens=1, progress=False)
    assert time.perf_counter() - t < 1.0  # refused before anything is allocated
    # under the limits, and over the token limit with allow_long: it runs
    r = s.generate([1, 2, 3], method="plain", max_new_tokens=4, n=2, seed=0, progress=False)
    assert len(r) == 2
    work_limits.MAX_PLANNED_TOKENS, saved = 4, work_limits.MAX_PLANNED_TOKENS
    try:
        with pytest.raises(ConfigError, match="allow_long=True"):
            s.generate([1, 2, 3], method="plain", max_new_tokens=4, n=2, seed=0, progress=False)
        r2 = s.generate([1, 2, 3], method="plain", max_new_tokens=4, n=2, seed=0, progress=False, allow_long=True)
    finally:
        work_limits.MAX_PLANNED_TOKENS = saved
    assert [x.token_ids for x in r2] == [x.token_ids for x in r]


def test_available_memory_is_read_here():
    avail = work_limits.available_memory()
    assert avail is None or avail > 0


# ---------------------------------------------------------------- sample
@pytest.mark.parametrize("args,match", [
    (["--n", "1000000000"], r"1,000,000,000 chains .* need at least 715 GiB of memory"),
    (["--steps", "1000000000"], r"over the limit of 1e\+09; .*or pass --allow-long to run it anyway"),
    (["--n", "3000000", "--max-new-tokens", "100", "--block-size", "10"], r"3,000,000 chains .* plan 1\.14e\+09"),
])
def test_sample_refuses_unbounded_work_before_loading(model_dir, monkeypatch, capsys, memory_8g, args, match):
    _no_load(monkeypatch)
    t = time.perf_counter()
    assert _sample(model_dir, *args) == 2
    assert time.perf_counter() - t < 1.0
    import re

    assert re.search(match, _one_line(capsys))


def test_sample_refuses_an_expected_time_over_24h(model_dir, monkeypatch, capsys, keep_threads):
    """12 decode steps at a (faked) 2.5 h each: over the 24 h limit unless --allow-long."""
    monkeypatch.setattr(cli_output, "time_decode_step", lambda model, rows: 9000.0)
    seen = _spy_generate(monkeypatch)
    assert _sample(model_dir) == 2
    line = _one_line(capsys)
    assert "expected run time ~30.0 h (12 decode steps at 9000000 ms) is over the limit of 24 h" in line
    assert "--allow-long" in line and not seen
    assert _sample(model_dir, "--allow-long") == 0 and seen["allow_long"] is True
    monkeypatch.setattr(cli_output, "time_decode_step", lambda model, rows: 1.0)
    seen.clear()
    assert _sample(model_dir) == 0 and "allow_long" not in seen  # generate keeps its default


@pytest.mark.parametrize("prompt,match", [
    ("\udcff", "--prompt 1 is not valid text (byte 0xff at character 0)"),  # argv byte 0xff, as Python decodes it
    ("ab\ud800", "--prompt 1 is not valid text (a lone surrogate U+D800 at character 2)"),
])
def test_sample_undecodable_prompt_is_one_line(model_dir, monkeypatch, capsys, prompt, match):
    _no_load(monkeypatch)
    assert _sample(model_dir, "--prompt", prompt) == 2
    assert match in _one_line(capsys)


@pytest.mark.parametrize("method", ["mh", "plain", "smc"])
def test_sample_tiny_temperature_is_one_line(model_dir, capsys, keep_threads, method):
    """Refused as a parameter, or the chain's non-finite logits: either way one line, exit 2."""
    assert _sample(model_dir, "--temperature", "1e-300", "--method", method, "--particles", "2") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("powersample-fast: error:"), err


def test_threads_capped_to_usable_cores(model_dir, monkeypatch, capsys, keep_threads):
    seen = _spy_generate(monkeypatch)
    monkeypatch.setattr(cli_setup, "usable_cores", lambda: 2)
    assert _sample(model_dir, "--threads", "10000") == 0 and seen["threads"] == 2
    assert "--threads 10000 capped to 2" in capsys.readouterr().err
    assert _sample(model_dir, "--threads", "1") == 0 and seen["threads"] == 1
    assert "capped" not in capsys.readouterr().err
