"""EOS across stages (ALGORITHM.md step 3) on a toy where the paper's early stop and the exact rule
are far apart: logits depend only on the last token (the `markov_dir` fixture: helpers.tiny_models.MARKOV_EOS_TABLE), the first
generated token is EOS half the time, and continuations are near-deterministic. Both laws are
computed exactly (helpers.laws.mh_chain_law); the default sampler lands within sampling noise of
p^alpha, the early-stop option within noise of its own (different) law, and the naive baseline
agrees with the fast sampler."""
import numpy as np
import pytest

import powersample_fast as pf
from powersample_fast.naive import NaiveSampler
from helpers.laws import chi_square_pvalue, counts_of, exact_power_law, mh_chain_law, sample_law, tv

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

EOS, PROMPT, T, B, ALPHA, STEPS = 3, [0], 4, 2, 4.0, 12
P_MIN = 1e-3


@pytest.fixture(scope="module")
def laws(markov_dir):
    kw = dict(alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=STEPS, eos_id=EOS, proposal_temperature=1.0)
    return {"pi": exact_power_law(markov_dir, PROMPT, ALPHA, T, EOS),
            "exact": mh_chain_law(markov_dir, PROMPT, **kw),
            "early": mh_chain_law(markov_dir, PROMPT, early_stop=True, **kw)}


def _bound(target, chain_law, n, seed=0):
    """99.9% quantile of TV(target, n exact draws of chain_law): sampling noise + the computed gap."""
    rng = np.random.default_rng(seed)
    return float(np.quantile([tv(target, sample_law(chain_law, n, rng)) for _ in range(1000)], 0.999))


def test_the_toy_separates_the_two_rules(laws):
    assert laws["pi"][(EOS,)] > 0.5
    assert tv(laws["early"], laws["pi"]) > 0.1  # the early-stop limit keeps (EOS,) at its stage-1 mass
    assert tv(laws["exact"], laws["pi"]) < 0.01  # the exact rule's 12-step law is close to p^alpha


def test_default_is_exact_and_early_stop_is_its_own_law(markov_dir, laws):
    model, _ = pf.load(markov_dir, device="cpu", dtype="float32")
    s = pf.PowerSampler(model)
    n = 3000
    kw = dict(alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=STEPS, proposal_temperature=1.0, n=n,
              progress=False, max_batch=128)
    exact = counts_of(r.token_ids for r in s.generate(PROMPT, seed=1, **kw))
    early = counts_of(r.token_ids for r in s.generate(PROMPT, seed=2, early_stop=True, **kw))
    assert chi_square_pvalue(exact, laws["exact"]) > P_MIN
    assert tv(laws["pi"], exact) < _bound(laws["pi"], laws["exact"], n)
    assert chi_square_pvalue(early, laws["early"]) > P_MIN
    assert tv(laws["pi"], early) > tv(laws["pi"], exact) + 0.05
    assert chi_square_pvalue(early, laws["pi"]) < 1e-6  # early stop is measurably not p^alpha


def test_jump_is_reported_and_last_block_keeps_early_stop(markov_dir):
    model, _ = pf.load(markov_dir, device="cpu", dtype="float32")
    s = pf.PowerSampler(model)
    kw = dict(alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=2, proposal_temperature=1.0, n=40,
              progress=False, seed=3)
    res = s.generate(PROMPT, **kw)
    jumped = [r for r in res if r.extra["jumped_to_final_stage"]]
    assert jumped and all(r.extra["stage"] == 2 for r in jumped)
    assert all(r.proposed == 2 * 2 for r in jumped)  # stage 1's steps + the final stage's steps
    lb = s.generate(PROMPT, index="last_block", **kw)
    assert not any(r.extra["jumped_to_final_stage"] for r in lb)


def test_naive_follows_the_same_rule(markov_dir):
    """The naive baseline jumps too: same seed scheme, same law (two-sample check on a few hundred
    chains against the computed law; the naive sampler is slow)."""
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(str(markov_dir)).eval()
    nv = NaiveSampler(hf, eos_token_ids=[EOS])
    kw = dict(alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=4, proposal_temperature=1.0, progress=False)
    res = nv.generate(PROMPT, n=300, seed=5, **kw)
    law = mh_chain_law(markov_dir, PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=4, eos_id=EOS,
                       proposal_temperature=1.0)
    early = mh_chain_law(markov_dir, PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=4, eos_id=EOS,
                         proposal_temperature=1.0, early_stop=True)
    counts = counts_of(r.token_ids for r in res)
    assert chi_square_pvalue(counts, law) > P_MIN
    assert any(r.extra["jumped_to_final_stage"] for r in res)
    assert tv(law, early) > 0.05
