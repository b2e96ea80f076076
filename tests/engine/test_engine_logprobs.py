"""Log-probs from the engine (`SamplingParams.logprobs` / `prompt_logprobs`, engine/logprob_rows.py):
every returned value against a direct computation (one full forward of the HF twin of the model,
log-softmax in fp32), for every method, with rows that move (compaction), MH accepts that commit
proposals, SMC resampling, buffers that grow while requests run, and a chunked scoring prefill."""
import pytest
import torch

from powersample_fast.engine import Engine, logprob_rows
from powersample_fast.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 1e-4


def _drain(eng):
    out, streamed = {}, {}
    while eng.has_unfinished():
        for o in eng.step():
            for j, e in o.new_logprobs.items():
                streamed.setdefault((o.request_id, j), []).extend(e)
            if o.finished:
                out[o.request_id] = o
    return out, streamed


@torch.no_grad()
def _direct(hf, ids):
    """log-softmax [len(ids), V] of the HF model over `ids` (position i predicts ids[i + 1])."""
    return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)


def _check_generated(hf, prompt, r, n):
    full = _direct(hf, prompt + r.token_ids)
    P = len(prompt)
    assert len(r.token_logprobs) == len(r.top_logprobs) == len(r.token_ids) > 0
    for i, t in enumerate(r.token_ids):
        row = full[P - 1 + i]
        assert abs(r.token_logprobs[i] - row[t].item()) < ATOL
        assert abs(r.token_logprobs[i] - r.logp[i]) < ATOL  # the sampling pass's lp, up to rounding
        ids = [a for a, _ in r.top_logprobs[i]]
        assert ids == row.topk(n).indices.tolist()
        for a, v in r.top_logprobs[i]:
            assert abs(v - row[a].item()) < ATOL
        if t == ids[0]:  # greedy here: bit-identical to the first top value
            assert r.token_logprobs[i] == r.top_logprobs[i][0][1]


METHODS = {"plain": dict(proposal_temperature=0.9),
           "mh": dict(mcmc_steps=3, block_size=3, proposal_temperature=1.0),
           "smc": dict(particles=4, proposal_temperature=1.0, ess_threshold=1.0),
           "sps": dict(block_size=3, sps_candidates=4, sps_top_k=2, sps_rollouts=2, sps_horizon=2),
           "sps_token": dict(sps_top_k=2, sps_rollouts=2, sps_horizon=2)}


def test_every_method_returns_the_direct_log_probs(tiny):
    model, hf = tiny
    eng = Engine(model, max_batch=16, max_len=64)
    prompt = [3, 9, 4, 1]
    rids = {}
    for m, kw in METHODS.items():
        rids[m] = eng.add_request(prompt, SamplingParams(method=m, max_new_tokens=8, seed=2, logprobs=4, **kw))
    plain_free = eng.add_request(prompt, SamplingParams(method="plain", max_new_tokens=3, seed=1))  # moves rows away
    out, _ = _drain(eng)
    assert out[plain_free].results[0].token_logprobs is None
    for m, rid in rids.items():
        _check_generated(hf, prompt, out[rid].results[0], 4)
    assert eng.runner.logprobs.n == 4


def test_prompt_scores_match_hf_and_chunking(tiny, monkeypatch):
    model, hf = tiny
    monkeypatch.setattr(logprob_rows, "CHUNK", 3)  # 9 prompt positions: 3 chunks
    eng = Engine(model, max_batch=4, max_len=64)
    prompt = [5, 2, 8, 8, 1, 0, 44, 60, 12, 7]
    rid = eng.add_request(prompt, SamplingParams(method="plain", max_new_tokens=2, seed=0, n=2, prompt_logprobs=3,
                                                 logprobs=1))
    one = eng.add_request([9], SamplingParams(method="plain", max_new_tokens=2, seed=0, prompt_logprobs=0))
    out, _ = _drain(eng)
    scores = out[rid].prompt_logprobs
    full = _direct(hf, prompt)
    assert scores[0] is None and len(scores) == len(prompt)
    for i in range(1, len(prompt)):
        own, top = scores[i]
        assert abs(own - full[i - 1, prompt[i]].item()) < ATOL
        assert [a for a, _ in top] == full[i - 1].topk(3).indices.tolist()
        assert top[0][0] != prompt[i] or own == top[0][1]
    # the samples of the scored prompt decode from the prefilled K/V: their log-probs are right too
    for r in out[rid].results:
        _check_generated(hf, prompt, r, 1)
        assert r.stats["tokens_prefilled"] in (0, len(prompt))
    assert out[one].prompt_logprobs == [None]


def test_buffers_grow_while_requests_run_and_streams_match(tiny):
    model, hf = tiny
    eng = Engine(model, max_batch=4, max_len=64)
    prompt = [1, 2, 3]
    a = eng.add_request(prompt, SamplingParams(method="plain", max_new_tokens=12, seed=5, logprobs=2), stream=True)
    for _ in range(4):
        eng.step()
    b = eng.add_request(prompt, SamplingParams(method="plain", max_new_tokens=6, seed=6, logprobs=7))
    out, streamed = _drain(eng)
    ra, rb = out[a].results[0], out[b].results[0]
    _check_generated(hf, prompt, ra, 2)
    _check_generated(hf, prompt, rb, 7)
    tail = streamed[(a, 0)]  # the steps after the first four, as streamed
    assert [e[0] for e in tail] == ra.token_logprobs[-len(tail):]
    assert [e[1] for e in tail] == ra.top_logprobs[-len(tail):]


def test_validation():
    for bad in (-1, 21, 2.5, True):
        with pytest.raises(Exception, match="logprobs must be an integer in 0..20"):
            SamplingParams(logprobs=bad)
    assert SamplingParams(logprobs=0, prompt_logprobs=20).prompt_logprobs == 20
    assert SamplingParams(stop="x").stop == ("x",) and SamplingParams(stop=None).stop == ()
    with pytest.raises(Exception, match="stop must be"):
        SamplingParams(stop=["ok", ""])


def test_stop_strings_need_a_tokenizer(tiny):
    eng = Engine(tiny[0], max_batch=2, max_len=32)
    with pytest.raises(Exception, match="stop strings need the model's tokenizer"):
        eng.add_request([1, 2], SamplingParams(method="plain", max_new_tokens=2, stop=["a"]))


@pytest.mark.slow
def test_kernel_path_gives_the_same_log_probs(tiny, monkeypatch):
    model, _ = tiny
    kw = SamplingParams(method="mh", max_new_tokens=6, mcmc_steps=2, block_size=3, seed=3, logprobs=3,
                        prompt_logprobs=2)
    runs = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("POWERSAMPLE_FAST_BACKEND", backend)
        eng = Engine(model, max_batch=2, max_len=32)
        rid = eng.add_request([4, 5, 6, 7], kw)
        runs.append(_drain(eng)[0][rid])
    (t, k) = runs
    assert t.results[0].token_ids == k.results[0].token_ids
    assert [a for a, _ in sum(t.results[0].top_logprobs, [])] == [a for a, _ in sum(k.results[0].top_logprobs, [])]
    torch.testing.assert_close(torch.tensor(t.results[0].token_logprobs), torch.tensor(k.results[0].token_logprobs),
                               atol=ATOL, rtol=0)
    assert [e and e[1][0][0] for e in t.prompt_logprobs] == [e and e[1][0][0] for e in k.prompt_logprobs]
