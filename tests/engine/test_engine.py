"""The engine API (add_request / step / abort / has_unfinished): requests joining a running batch,
aborts, streaming, errors, a failing chain. The laws of plain sampling and of mixed batches:
laws/test_engine_law.py."""
import pytest

import powersample_fast as pf
from powersample_fast.engine import Engine
from powersample_fast.errors import ConfigError, NonFiniteLogitsError
from powersample_fast.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return tiny[0]


def _drain(eng):
    out = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o
    return out


def test_requests_join_a_running_batch_and_keep_their_outputs(tiny_model):
    """A request added while others run joins the batch; per-request seeds make every output
    independent of what else is in the batch (same tokens as the request run alone)."""
    p1 = SamplingParams(alpha=3.0, max_new_tokens=24, block_size=8, mcmc_steps=2, n=2, seed=5)
    p2 = SamplingParams(method="plain", max_new_tokens=20, n=3, seed=6)
    alone = {}
    for name, prompt, p in (("a", [1, 2, 3], p1), ("b", [4, 5], p2)):
        e = Engine(tiny_model, max_batch=8, max_len=40)
        e.add_request(prompt, p, request_id=name)
        alone[name] = [r.token_ids for r in _drain(e)[name].results]
    eng = Engine(tiny_model, max_batch=8, max_len=40)
    eng.add_request([1, 2, 3], p1, request_id="a")
    outs, steps = {}, 0
    while eng.has_unfinished():
        if steps == 3:
            assert eng.num_running == 1
            eng.add_request([4, 5], p2, request_id="b")
            assert eng.num_waiting == 1
        for o in eng.step():
            outs[o.request_id] = o
        steps += 1
    assert eng.stats["max_batch_rows"] == 5  # 2 chains of "a" + 3 samples of "b" decoded together
    assert {k: [r.token_ids for r in o.results] for k, o in outs.items()} == alone
    assert all(o.finished and o.error is None for o in outs.values())
    assert not eng.has_unfinished() and eng.step() == []


def test_abort_frees_rows_at_once(tiny_model):
    eng = Engine(tiny_model, max_batch=4, max_len=60)
    p = SamplingParams(alpha=2.0, max_new_tokens=50, block_size=10, mcmc_steps=3, n=4, seed=1)
    rid = eng.add_request([1, 2, 3], p)
    q = eng.add_request([9, 8], SamplingParams(method="plain", max_new_tokens=5, n=2, seed=2))
    for _ in range(3):
        eng.step()
    assert eng.num_waiting == 1 and len(eng.kv.free_decode) == 0  # q waits for rows
    assert eng.abort(rid) and not eng.abort(rid) and not eng.abort("nope")
    assert len(eng.kv.free_decode) == 4 and len(eng.kv.free_store) == 4
    out = _drain(eng)
    assert list(out) == [q] and len(out[q].results) == 2  # q reused the freed rows
    assert rid not in out


def test_stream_outputs_carry_plain_tokens(tiny_model):
    eng = Engine(tiny_model, max_batch=4, max_len=30)
    rid = eng.add_request([1, 2], SamplingParams(method="plain", max_new_tokens=6, n=2, seed=3), stream=True)
    got = {0: [], 1: []}
    final = None
    while eng.has_unfinished():
        for o in eng.step():
            for i, toks in o.new_tokens.items():
                got[i] += toks
            if o.finished:
                final = o
    assert final is not None and final.request_id == rid
    assert [got[0], got[1]] == [r.token_ids for r in final.results]


def test_add_request_errors(tiny_model):
    eng = Engine(tiny_model, max_batch=2, max_len=30)
    with pytest.raises(ConfigError, match="engine's max_len of 30"):
        eng.add_request([1, 2, 3], SamplingParams(max_new_tokens=28))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        eng.add_request([1, 99], SamplingParams(max_new_tokens=2))
    with pytest.raises(ConfigError, match="SamplingParams"):
        eng.add_request([1, 2], {"alpha": 2})
    with pytest.raises(ConfigError, match="unknown method"):
        SamplingParams(method="beam")
    eng.add_request([1, 2], SamplingParams(max_new_tokens=2), request_id="x")
    with pytest.raises(ConfigError, match="already running"):
        eng.add_request([1, 2], SamplingParams(max_new_tokens=2), request_id="x")


def test_one_failing_chain_keeps_the_others(tiny_model):
    """Non-finite logits in one prompt's chains: by default the error is raised after the other
    chains finished, with every result attached; errors="return" returns them, failed ones marked."""
    w = tiny_model.tok_embeddings.weight
    saved = w[60].clone()
    try:
        w[60] = float("nan")
        kw = dict(max_new_tokens=6, block_size=3, mcmc_steps=1, seed=0, progress=False)
        with pytest.raises(NonFiniteLogitsError, match=r"prompt 1, sample 0") as ei:
            pf.PowerSampler(tiny_model).generate([[1, 2], [60, 2]], **kw)
        res = ei.value.results
        assert [(r.prompt_index, "error" in r.extra) for r in res] == [(0, False), (1, True)]
        assert len(res[0].token_ids) == 6
        res2 = pf.PowerSampler(tiny_model).generate([[1, 2], [60, 2]], errors="return", **kw)
        assert [r.token_ids for r in res2][0] == res[0].token_ids and "non-finite" in res2[1].extra["error"]
    finally:
        w[60] = saved
