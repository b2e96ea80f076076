"""Stop strings that stop (ALGORITHM.md "Stop strings"): plain ends a sample at one; the samplers
treat one like EOS, so their target is p^alpha over completions truncated at the first stop string.

Law test on the default enumerable toy (tests/helpers/tiny_models.py) with a tokenizer whose tokens
are two characters ("ay", "xa", "ab", EOS) and the stop string "ya", which no token contains: it is
spelled only across two tokens ("ay" + "ay", "ay" + "ab"). tests/helpers/laws.py enumerates the
truncated state space (a state whose text holds "ya" has ended, as if by EOS) and computes the exact law of
Algorithm 1 after N steps on it; MH with the stop string matches it, and a wrong variant (the
sampler ignores the stop string, the text is cut afterwards, as the server did before) is rejected.
"""
import json
import math

import numpy as np
import pytest

import powersample_fast as pf
from powersample_fast.engine.stop_strings import StopWatch, completes
from helpers.laws import (chi_square_pvalue, counts_of, exact_power_law, mh_chain_law, proposal_law, sample_law,
                          toy_tree, tv)
from helpers.tiny_models import make_toy_model_dir
from helpers.toy_mixing import mixing_chain_law

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPT, T, EOS, ALPHA, B, STEPS = [0, 1], 4, 3, 2.0, 2, 12
TEXTS = ["ay", "xa", "ab", ""]  # token 3 is EOS
STOPS = ["ya"]
STOP = (TEXTS, STOPS)
P_MIN = 1e-3


def write_tokenizer(d, texts, eos_id):
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(texts) if i != eos_id}
    vocab["<eos>"] = eos_id
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(["<eos>"])
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                         "eos_token": "<eos>", "model_max_length": 64}))


@pytest.fixture(scope="module")
def stop_toy(tmp_path_factory):
    d = make_toy_model_dir(tmp_path_factory.mktemp("stoptoy"))
    write_tokenizer(d, TEXTS, EOS)
    return d


@pytest.fixture(scope="module")
def sampler(stop_toy):
    model, tok = pf.load(stop_toy, device="cpu", dtype="float32")
    assert tok.decode([0, 0, 2], skip_special_tokens=True) == "ayayab"
    return pf.PowerSampler(model, tok)


@pytest.fixture(scope="module")
def laws(stop_toy):
    kw = dict(alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=STEPS, eos_id=EOS, proposal_temperature=1.0)
    tree = toy_tree(stop_toy, PROMPT, T, EOS, STOP)
    out = {"pi": exact_power_law(stop_toy, PROMPT, ALPHA, T, EOS, stop=STOP),
           "chain": mh_chain_law(stop_toy, PROMPT, stop=STOP, **kw),
           "tree": tree}
    # the wrong variant's law: Algorithm 1 on the untruncated space, each output cut at its first stop string
    cut = {}
    for s, p in mh_chain_law(stop_toy, PROMPT, **kw).items():
        j = next(j for j in range(1, len(s) + 1) if tree.ended(s[:j]) or j == len(s))
        cut[s[:j]] = cut.get(s[:j], 0.0) + p
    out["ignored"] = cut
    return out


def _cut(tree, s):
    s = tuple(s)
    return s[:next(j for j in range(1, len(s) + 1) if tree.ended(s[:j]) or j == len(s))] if s else s


def test_the_toy_spells_the_stop_across_tokens(laws):
    tree, pi = laws["tree"], laws["pi"]
    assert not any(x in t for t in TEXTS for x in STOPS)
    stopped = {s: p for s, p in pi.items() if s[-1] != EOS and tree.ended(s)}
    assert {(0, 0), (0, 2)} <= set(stopped) and 0.3 < sum(stopped.values()) < 0.9
    assert tv(laws["chain"], pi) < 0.01  # 12 steps per stage: the exact chain law is close to the target
    assert tv(laws["ignored"], pi) > 0.2  # ignoring the stop string samples another law


def test_stop_watch_finds_strings_across_tokens(sampler):
    tok = sampler.tokenizer
    w = StopWatch(tok, ["ya"])
    assert [w.push(t) for t in (1, 2, 0)] == [False, False, False]  # "xa" "ab" "ay": no "ya"
    assert w.push(0) is True  # ... "ay" "ay" -> "xaabayay"
    assert completes(tok, ["ya"], [1, 0], 0) and not completes(tok, ["ya"], [1, 0], 1)
    assert completes(tok, ["ayxa"], [1, 1, 0], 1)  # a stop longer than a token, across three
    long_prefix = [1] * 200 + [0]
    assert completes(tok, ["ya"], long_prefix, 2) and not completes(tok, ["ya"], long_prefix, 1)


def test_mh_stop_as_eos_law_and_the_ignoring_variant_is_rejected(sampler, laws):
    n = 3000
    kw = dict(alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=STEPS, proposal_temperature=1.0, n=n,
              progress=False, max_batch=256)
    res = sampler.generate(PROMPT, seed=1, stop=STOPS, **kw)
    counts = counts_of(r.token_ids for r in res)
    assert all(r.finished_by_stop == (laws["tree"].ended(tuple(r.token_ids)) and r.token_ids[-1] != EOS)
               for r in res)
    assert chi_square_pvalue(counts, laws["chain"]) > P_MIN
    rng = np.random.default_rng(0)
    bound = float(np.quantile([tv(laws["pi"], sample_law(laws["chain"], n, rng)) for _ in range(500)], 0.999))
    assert tv(laws["pi"], counts) < bound
    # wrong variant: the sampler does not know the stop string; its outputs are cut afterwards
    wrong = counts_of(_cut(laws["tree"], r.token_ids) for r in sampler.generate(PROMPT, seed=2, **kw))
    assert chi_square_pvalue(wrong, laws["ignored"]) > P_MIN  # (it is what it claims to be)
    assert chi_square_pvalue(wrong, laws["chain"]) < 1e-6  # and the law test rejects it


@pytest.mark.parametrize("kw", [dict(index="entropy"), dict(mh_tries=2), dict(mh_tries=2, index="entropy")],
                         ids=["entropy", "tries2", "tries2-entropy"])
def test_mh_mixing_options_stop_as_eos_law(sampler, stop_toy, laws, kw):
    """The MH mixing options (issue 22) on the truncated space: chi-square against their own computed
    law (helpers/toy_mixing.py with the stop string), every output ends where the space says."""
    n = 3000
    res = sampler.generate(PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=STEPS,
                           proposal_temperature=1.0, n=n, seed=4, stop=STOPS, progress=False, max_batch=256, **kw)
    assert all(r.finished_by_stop == (laws["tree"].ended(tuple(r.token_ids)) and r.token_ids[-1] != EOS)
               for r in res)
    law = mixing_chain_law(stop_toy, PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=STEPS,
                           eos_id=EOS, proposal_temperature=1.0, index=kw.get("index", "uniform"),
                           tries=kw.get("mh_tries", 1), stop=STOP)
    assert chi_square_pvalue(counts_of(r.token_ids for r in res), law) > P_MIN
    assert tv(law, laws["pi"]) < 0.01


def test_plain_stops_at_the_string(sampler, stop_toy):
    law = proposal_law(stop_toy, PROMPT, 1.0, T, EOS, stop=STOP)
    res = sampler.generate(PROMPT, method="plain", max_new_tokens=T, n=2000, seed=3, stop=STOPS, progress=False,
                           max_batch=256)
    assert chi_square_pvalue(counts_of(r.token_ids for r in res), law) > P_MIN
    stopped = [r for r in res if r.finished_by_stop]
    assert stopped and all("ya" in r.text and not r.finished_by_eos for r in stopped)
    assert all(r.stats["tokens_sampled"] == len(r.token_ids) for r in res)  # no token after the stop


@pytest.mark.parametrize("method,kw", [("smc", dict(particles=4, proposal_temperature=1.0)),
                                       ("sps", dict(block_size=2, sps_candidates=6, sps_top_k=3, sps_rollouts=2,
                                                    sps_horizon=2)),
                                       ("sps_token", dict(sps_top_k=3, sps_rollouts=2, sps_horizon=2))])
def test_smc_and_sps_end_at_stop_strings(sampler, laws, method, kw):
    tree = laws["tree"]
    res = sampler.generate(PROMPT, method=method, alpha=ALPHA, max_new_tokens=T, n=60, seed=5, stop=STOPS,
                           progress=False, max_batch=256, **kw)
    for r in res:  # every output is a state of the truncated space: nothing after a stop string
        s = tuple(r.token_ids)
        assert all(not tree.ended(s[:j]) for j in range(1, len(s))), s
        assert r.finished_by_stop == (tree.ended(s) and s[-1] != EOS)
    assert any(r.finished_by_stop for r in res)
    assert math.isfinite(sum(r.logp[0] for r in res))
