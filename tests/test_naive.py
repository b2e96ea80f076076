"""The naive baseline's mechanics (its laws: laws/test_naive_law.py): alpha = 1 without EOS accepts
every proposal, stats count the recomputed prefixes, EOS ids are collected, bad inputs are errors."""
import numpy as np
import pytest

from powersample_fast.errors import ConfigError
from powersample_fast.naive import NaiveSampler
from helpers.laws import B, PROMPT, T, load_toy_model
from helpers.tiny_models import make_toy_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sampler(toy_dir):
    # explicit CPU/fp32: a path loads on CUDA in bf16 by default
    return NaiveSampler(toy_dir, device="cpu", dtype="float32")


def _run(sampler, n, **kw):
    kw = {"alpha": 4.0, "max_new_tokens": T, "block_size": B, "n": n, "progress": False, **kw}
    return sampler.generate(PROMPT, **kw)


def test_alpha_one_without_eos_accepts_everything(tmp_path):
    d = make_toy_model_dir(tmp_path / "noeos", eos_id=None)
    s = NaiveSampler(d, device="cpu", dtype="float32")
    assert s.eos_token_ids == []
    res = s.generate(PROMPT, alpha=1.0, proposal_temperature=1.0, max_new_tokens=5, block_size=2,
                     mcmc_steps=4, n=20, seed=3, progress=False)
    assert all(r.proposed == 12 and r.accepted == r.proposed for r in res)  # 3 stages x 4 steps
    assert all(len(r.token_ids) == 5 and not r.finished_by_eos for r in res)
    np.testing.assert_allclose(res[0].logp, res[0].logq, atol=1e-6)


def test_stats_count_recomputation(sampler):
    (r0,) = _run(sampler, 1, mcmc_steps=0, seed=5)
    (r,) = _run(sampler, 1, mcmc_steps=6, seed=5)
    st = r.stats
    assert st["tokens_prefilled"] > len(PROMPT) and st["tokens_decoded"] == st["tokens_sampled"] > 0
    stages = st["generate_calls"] // 7
    assert st["generate_calls"] == 7 * stages and r.proposed == 6 * stages
    # prefill = one prompt per call + the kept prefixes: at least the prompt, each call
    assert st["tokens_prefilled"] >= len(PROMPT) * st["generate_calls"]
    if not r0.finished_by_eos or len(r0.token_ids) > B:
        assert r0.stats["tokens_prefilled"] == len(PROMPT) + (len(PROMPT) + B)
    assert r.stats["wall_s"] > 0 and r.text == ""
    # deterministic given the seed
    again = _run(sampler, 1, mcmc_steps=6, seed=5)[0]
    assert again.token_ids == r.token_ids and again.logp == r.logp and again.accepted == r.accepted


def test_eos_ids_collected(toy_dir):
    model = load_toy_model(toy_dir)
    model.generation_config.eos_token_id = [2, 3]
    assert NaiveSampler(model).eos_token_ids == [2, 3]
    assert NaiveSampler(model, eos_token_ids=1).eos_token_ids == [1]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha": 0.0},
        {"block_size": 0},
        {"mcmc_steps": -1},
        {"index": "middle"},
        {"index": "entropy"},  # issue 22: the fast sampler's option only
        {"top_k": 0},
        {"proposal_temperature": -1.0},
        {"max_new_tokens": 100},  # 2 + 100 > max_position_embeddings = 64
        {"prompts": [0, 7]},  # token outside the vocabulary
        {"prompts": []},
        {"prompts": "text without a tokenizer"},
    ],
)
def test_bad_inputs(sampler, kwargs):
    kw = {"prompts": PROMPT, "max_new_tokens": T, "block_size": B, "progress": False, **kwargs}
    with pytest.raises(ConfigError):
        sampler.generate(kw.pop("prompts"), **kw)
