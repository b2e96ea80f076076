"""MH mixing options (issue 22): the entropy-guided cut (index="entropy") and multiple-try Metropolis
(mh_tries=k) on the engine. Fast tier: the derivation's invariance check on the exact one-step
kernels (helpers/toy_mixing.py), the bookkeeping (host mirrors against the token buffers and fp64
entropies), k = 1 bit-identical to Algorithm 1 before issue 22, parameters, the Triton path, and
mixed requests sharing one engine. The statistical law tests (3000 chains each, slow) are in
tests/laws/test_mh_mixing_law.py."""
import math
import random

import numpy as np
import pytest

import powersample_fast as pf
from powersample_fast.engine.policies import MHPolicy
from powersample_fast.engine.policies import mh_mixing as mix
from powersample_fast.errors import ConfigError
from powersample_fast.sampling_params import SamplingParams
from helpers.laws import ALPHA, B, EOS, PROMPT, T, _mh_matrix, exact_power_law, toy_tree
from helpers.toy_mixing import entropies, mixing_matrix

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_sampler(toy_dir):
    model, _ = pf.load(toy_dir, device="cpu", dtype="float32")
    return pf.PowerSampler(model)


def _gen(sampler, prompt, n, **kw):
    kw = {"alpha": ALPHA, "max_new_tokens": T, "block_size": B, "n": n, "progress": False, "max_batch": 128, **kw}
    return sampler.generate(prompt, **kw)


def test_params_validation_messages():
    p = SamplingParams(index="entropy", mh_tries=3, entropy_eps=0.5, entropy_beta=2)
    assert (p.mh_tries, p.entropy_eps, p.entropy_beta) == (3, 0.5, 2.0)
    assert MHPolicy().rows(p) == (5, 1) and MHPolicy().rows(SamplingParams()) == (1, 1)
    for kw, match in [(dict(mh_tries=0), r"mh_tries .* must be an integer >= 1"),
                      (dict(mh_tries=1.5), r"mh_tries .* must be an integer"),
                      (dict(mh_tries=2, method="smc"), "applies to method 'mh' only"),
                      (dict(mh_tries=65), "at most 64"),
                      (dict(entropy_eps=0.0), r"entropy_eps must be a number > 0"),
                      (dict(entropy_beta=float("nan")), r"entropy_beta must be a number > 0"),
                      (dict(entropy_beta=17), "at most 16"),
                      (dict(entropy_eps=True), "entropy_eps must be"),
                      (dict(index="entropic"), "choose one of uniform, last_block, entropy")]:
        with pytest.raises(ConfigError, match=match):
            SamplingParams(**kw)


def test_cut_draw_and_try_selection_follow_their_weights():
    rng = random.Random(0)
    w = [0.1, 2.0, 0.1, 0.1, 1.0]
    cum = mix.prefix_sums(w)
    counts = np.bincount([mix.draw_cut(cum, 1, 5, rng.random()) for _ in range(20000)], minlength=5)
    assert counts[0] == 0  # below lo
    np.testing.assert_allclose(counts[1:] / 20000, np.array(w[1:]) / sum(w[1:]), atol=0.015)
    logw = [math.log(x) for x in (3.0, 1.0, 0.5)]
    sel = np.bincount([mix.select_try(logw, rng.random()) for _ in range(20000)], minlength=3)
    np.testing.assert_allclose(sel / 20000, np.array([3.0, 1.0, 0.5]) / 4.5, atol=0.015)
    # k = 1: the multiple-try ratio is Algorithm 1's
    assert mix.mtm_log_accept([-1.0], [], -3.0) == pytest.approx(2.0)


@pytest.mark.parametrize("kw,invariant", [
    (dict(index="entropy"), True), (dict(index="entropy", eps=0.01, beta=2.0), True),
    (dict(tries=2), True), (dict(tries=2, index="entropy"), True),
    (dict(index="entropy", index_term=False), False), (dict(tries=2, references=False), False),
], ids=["entropy", "entropy-eps.01-beta2", "tries2", "tries2-entropy", "WRONG-no-index-term",
        "WRONG-no-references"])
def test_exact_kernels_keep_p_alpha_invariant(toy_dir, kw, invariant):
    """The derivation (ALGORITHM.md "Faster mixing"), checked on the exact one-step kernels of the
    default toy's final stage (121 states): pi P = pi for the exact rules, not for the wrong ones;
    k = 1 with uniform cuts is Algorithm 1's kernel (toy._mh_matrix)."""
    tree = toy_tree(toy_dir, PROMPT, T, EOS)
    states = tree.states(T)
    pos = {s: i for i, s in enumerate(states)}
    lp = [tree.token_logprobs(s) for s in states]
    lq = [tree.token_logprobs(s, 1.0) for s in states]
    pi = exact_power_law(toy_dir, PROMPT, ALPHA, T, EOS)
    v = np.array([pi[s] for s in states])
    P = mixing_matrix(tree, states, pos, lp, lq, ALPHA, 0, **kw)
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-12)
    gap = 0.5 * np.abs(v @ P - v).sum()
    assert (gap < 1e-12) if invariant else (gap > 0.01), gap
    if kw == dict(tries=2):
        np.testing.assert_allclose(mixing_matrix(tree, states, pos, lp, lq, ALPHA, 0),
                                   _mh_matrix(states, pos, lp, lq, ALPHA, 0), atol=1e-14)


# Output of the sampler before issue 22 (commit 28ccfa4), default toy, seed 11, max_batch 4:
# (token ids, accepted) per chain. k = 1 with uniform / last_block cuts must reproduce it.
PRE_ISSUE_22 = {
    "default": (dict(mcmc_steps=3), [([0, 1, 0, 0], 6), ([0, 1, 0, 1], 6), ([0, 1, 0, 1], 6), ([0, 1, 0, 1], 6),
                                     ([0, 0, 1, 0], 6), ([0, 1, 0, 1], 5)]),
    "tau1_T6": (dict(mcmc_steps=4, proposal_temperature=1.0, max_new_tokens=6, block_size=4),
                [([0, 1, 3], 3), ([0, 1, 0, 1, 0, 0], 4), ([0, 0, 1, 0, 1, 0], 3), ([0, 1, 0, 1, 0, 1], 3),
                 ([3], 4), ([3], 5)]),
    "last_block": (dict(mcmc_steps=2, index="last_block", proposal_temperature=1.0),
                   [([0, 1, 0, 1], 1), ([0, 1, 0, 1], 1), ([0, 1, 3], 3), ([0, 1, 0, 1], 4), ([0, 1, 0, 1], 3),
                    ([0, 0, 2, 1], 2)]),
}


@pytest.mark.parametrize("case", sorted(PRE_ISSUE_22))
def test_one_try_is_algorithm_1_unchanged(toy_sampler, case):
    kw, want = PRE_ISSUE_22[case]
    kw = {"alpha": 4.0, "max_new_tokens": 4, "block_size": 2, "n": 6, "progress": False, "max_batch": 4,
          "seed": 11, "mh_tries": 1, **kw}
    got = [(r.token_ids, r.accepted) for r in toy_sampler.generate(PROMPT, **kw)]
    assert got == want


@pytest.mark.parametrize("kw", [dict(index="entropy"), dict(mh_tries=3), dict(mh_tries=2, index="entropy")],
                         ids=["entropy", "tries3", "tries2-entropy"])
def test_host_mirrors_match_buffers_and_exact_entropies(toy_dir, toy_sampler, monkeypatch, kw):
    """At the end of every chain, the host's per-token lp/lq/h and cut-weight prefix sums equal the
    token buffers (what acceptances committed, moves and copies carried) and the fp64 values of the
    final state (so the cut and W(x) always use the state's own entropies)."""
    seen = []
    finish = MHPolicy._finish

    def spy(self, eng, g):
        c, row, t = g.state, g.seqs[0].row, len(g.state.state)
        seen.append((tuple(c.state), list(c.hs), list(c.cum), list(c.lps), list(c.lqs),
                     eng.kv.h[0, row, :t].tolist(), eng.kv.lp[0, row, :t].tolist(), eng.kv.lq[0, row, :t].tolist(),
                     g.params))
        return finish(self, eng, g)

    monkeypatch.setattr(MHPolicy, "_finish", spy)
    res = _gen(toy_sampler, PROMPT, 24, mcmc_steps=4, proposal_temperature=1.0, seed=5, max_batch=12,
               max_new_tokens=6, block_size=3, **kw)
    assert len(seen) == 24 and sum(r.accepted for r in res) > 0
    tree = toy_tree(toy_dir, PROMPT, 6, EOS)
    for state, hs, cum, lps, lqs, h_buf, lp_buf, lq_buf, p in seen:
        exact_lp = tree.token_logprobs(state)
        if p.index == "entropy":
            np.testing.assert_allclose(hs, entropies(tree, state), atol=2e-6)
            assert hs == pytest.approx(h_buf, abs=1e-12)
            np.testing.assert_allclose(cum, mix.prefix_sums([mix.cut_weight(h, p.entropy_eps, p.entropy_beta)
                                                             for h in hs]), atol=1e-12)
        if p.mh_tries > 1:
            assert lps == pytest.approx(lp_buf, abs=1e-12) and lqs == pytest.approx(lq_buf, abs=1e-12)
            np.testing.assert_allclose(lps, exact_lp, atol=1e-5)
        np.testing.assert_allclose(lp_buf, exact_lp, atol=1e-5)


def test_tries_count_rows_and_tokens(toy_sampler):
    """A multiple-try chain decodes 2k - 1 suffixes per MH step (tokens_sampled counts them all)."""
    kw = dict(mcmc_steps=3, proposal_temperature=1.0, seed=2)
    one = _gen(toy_sampler, PROMPT, 20, **kw)
    three = _gen(toy_sampler, PROMPT, 20, mh_tries=3, **kw)
    s1 = np.mean([r.stats["tokens_sampled"] for r in one])
    s3 = np.mean([r.stats["tokens_sampled"] for r in three])
    assert all(r.proposed == 2 * 3 for r in one + three)
    assert 2.5 * s1 < s3 < 5 * s1 + 8


@pytest.mark.slow  # interpreted kernels on the engine: ~2 s
def test_triton_kernels_give_the_same_chains(toy_sampler, monkeypatch):
    """index="entropy" (entropy from the sampling kernel, index term and h commit in mh_accept_) and
    multiple tries with the Triton kernels forced (interpreted on CPU): the same chains as the torch
    reference, token for token."""
    kw = dict(mcmc_steps=2, proposal_temperature=1.0, seed=8, max_batch=8)
    runs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("POWERSAMPLE_FAST_BACKEND", backend)
        runs[backend] = [(r.token_ids, r.accepted) for r in _gen(toy_sampler, PROMPT, 3, index="entropy", **kw)
                         + _gen(toy_sampler, PROMPT, 1, mh_tries=2, index="entropy", **kw)]
    assert runs["triton"] == runs["torch"]


def test_mixed_requests_keep_their_outputs(tiny):
    """Entropy + multiple-try chains, Algorithm 1 chains and plain samples share one engine (queued
    admission, compaction moving held rows, forks and restores interleaved); each request's output
    equals that request run alone (per-chain random streams; nothing leaks between rows)."""
    from powersample_fast.engine import Engine

    model = tiny[0]
    reqs = {"mix": ([1, 2, 3], SamplingParams(alpha=3.0, max_new_tokens=24, block_size=8, mcmc_steps=2, n=2, seed=5,
                                              index="entropy", mh_tries=2, proposal_temperature=1.0)),
            "mh": ([4, 5], SamplingParams(alpha=2.0, max_new_tokens=20, block_size=10, mcmc_steps=2, n=2, seed=6)),
            "plain": ([7], SamplingParams(method="plain", max_new_tokens=12, n=3, seed=7))}

    def drain(eng, late=None):
        out, steps = {}, 0
        while eng.has_unfinished():
            if late and steps == 4:
                eng.add_request(*late[1], request_id=late[0])
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = [(r.token_ids, r.accepted) for r in o.results]
            steps += 1
        return out

    alone = {}
    for name, (prompt, p) in reqs.items():
        e = Engine(model, max_batch=8, max_len=40)
        e.add_request(prompt, p, request_id=name)
        alone.update(drain(e))
    eng = Engine(model, max_batch=8, max_len=40)
    for name in ("mix", "mh"):
        eng.add_request(*reqs[name], request_id=name)
    together = drain(eng, late=("plain", reqs["plain"]))
    assert eng.scheduler.moves > 0 and eng.stats["max_batch_rows"] == 8
    assert together == alone
    assert sum(a for _, a in together["mix"]) > 0


def test_options_return_the_direct_log_probs(tiny):
    """With logprobs asked (engine/logprob_rows.py), the returned log-probs of entropy-cut and
    multiple-try chains follow what was accepted (a try's log-prob buffers copied into the work row
    with its tokens): each equals a direct forward of the HF twin over the final sample."""
    import torch

    from powersample_fast.engine import Engine

    model, hf = tiny
    eng = Engine(model, max_batch=16, max_len=64)
    prompt = [3, 9, 4, 1]
    rid = eng.add_request(prompt, SamplingParams(max_new_tokens=8, block_size=4, mcmc_steps=3, n=3, seed=4, logprobs=3,
                                                 proposal_temperature=1.0, mh_tries=3, index="entropy"))
    out = {}
    while eng.has_unfinished():
        out.update({o.request_id: o for o in eng.step() if o.finished})
    res = out[rid].results
    assert sum(r.accepted for r in res) > 0
    for r in res:
        with torch.no_grad():
            full = torch.log_softmax(hf(torch.tensor([prompt + r.token_ids])).logits[0].float(), -1)
        for i, t in enumerate(r.token_ids):
            row = full[len(prompt) - 1 + i]
            assert abs(r.token_logprobs[i] - row[t].item()) < 1e-4 and abs(r.logp[i] - row[t].item()) < 1e-4
            assert [a for a, _ in r.top_logprobs[i]] == row.topk(3).indices.tolist()
