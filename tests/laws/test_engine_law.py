"""The engine's laws on the enumerable toy (vocab 4, EOS 3, prompt [0, 1], 4 new tokens, block 2): the
`plain` policy is ancestral sampling, and plain and mh requests sharing one batch each keep their law."""
import pytest

import powersample_fast as pf
from powersample_fast.engine import Engine
from powersample_fast.sampling_params import SamplingParams
from helpers.laws import ALPHA, B, EOS, P_MIN, PROMPT, T, chi_square_pvalue, counts_of, mh_chain_law, proposal_law

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def toy_model(toy_dir):
    return pf.load(toy_dir, device="cpu", dtype="float32")[0]


@pytest.mark.parametrize("temperature,top_k", [(None, None), (0.7, 2)], ids=["t1", "t0.7-top2"])
def test_plain_is_ancestral_sampling(toy_model, toy_dir, temperature, top_k):
    res = pf.PowerSampler(toy_model).generate(PROMPT, method="plain", max_new_tokens=T, n=3000, seed=11,
                                              proposal_temperature=temperature, top_k=top_k, progress=False,
                                              max_batch=128)
    law = proposal_law(toy_dir, PROMPT, temperature or 1.0, T, EOS, top_k=top_k)
    assert chi_square_pvalue(counts_of(r.token_ids for r in res), law) > P_MIN
    assert all(r.method == "plain" and r.proposed == 0 for r in res)


def test_mixed_batch_gives_each_method_its_law(toy_model, toy_dir):
    """plain and mh requests decode in one batch (different temperatures too); each has its law."""
    eng = Engine(toy_model, max_batch=96, max_len=len(PROMPT) + T)
    n = 1500
    plain = SamplingParams(method="plain", max_new_tokens=T, n=n, seed=1, proposal_temperature=0.5)
    mh = SamplingParams(method="mh", alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=3, n=n, seed=2,
                        proposal_temperature=1.0)
    a, b = eng.add_request(PROMPT, plain), eng.add_request(PROMPT, mh)
    out = {}
    while eng.has_unfinished():
        out.update({o.request_id: o for o in eng.step() if o.finished})
    assert eng.stats["max_batch_rows"] == 96
    law_plain = proposal_law(toy_dir, PROMPT, 0.5, T, EOS)
    law_mh = mh_chain_law(toy_dir, PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=3, eos_id=EOS,
                          proposal_temperature=1.0)
    assert chi_square_pvalue(counts_of(r.token_ids for r in out[a].results), law_plain) > P_MIN
    assert chi_square_pvalue(counts_of(r.token_ids for r in out[b].results), law_mh) > P_MIN
    assert {r.method for r in out[a].results} == {"plain"} and {r.method for r in out[b].results} == {"mh"}
