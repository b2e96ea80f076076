"""PowerSampler: KV reuse accounting, batching independence, API contract, errors, drop-in."""
import math
from types import SimpleNamespace

import pytest
import torch

from powersample_fast.errors import ConfigError, NonFiniteLogitsError
from powersample_fast.api import PowerSampler


def _recompute_logprobs(model, prompt, tokens, tau):
    """lp/lq of `tokens` after `prompt` by one full forward from scratch."""
    ids = torch.tensor([prompt + tokens])
    z = model(ids)[0, len(prompt) - 1:-1].double()
    t = torch.tensor(tokens)[:, None]
    lp = torch.log_softmax(z, -1).gather(1, t)[:, 0]
    lq = torch.log_softmax(z / tau, -1).gather(1, t)[:, 0]
    return lp, lq


def test_logprobs_match_recomputation_and_kv_reuse(tiny):
    """Every returned token's logp/logq equals a from-scratch forward of the final sequence (so the
    reused / restored KV is right after any mix of accepts and rejects), and the cost accounting
    shows no prefix recomputation: positions computed = (prompt - 1) + tokens sampled."""
    model, _ = tiny
    s = PowerSampler(model)
    prompts = [[1, 2, 3, 4, 5], [9, 8], [3] * 11]
    res = s.generate(prompts, alpha=4.0, max_new_tokens=40, block_size=12, mcmc_steps=5, n=2, seed=3,
                     progress=False, max_batch=4)
    assert [(r.prompt_index, r.sample_index) for r in res] == [(i, j) for i in range(3) for j in range(2)]
    saw_reject = saw_accept = False
    n_full = 0
    for r in res:
        pr = prompts[r.prompt_index]
        assert 1 <= len(r.token_ids) <= 40
        assert r.finished_by_eos == (r.token_ids[-1] == 7)
        assert 7 not in r.token_ids[:-1]  # EOS only at the end
        lp, lq = _recompute_logprobs(model, pr, r.token_ids, 0.25)
        assert torch.allclose(torch.tensor(r.logp, dtype=torch.float64), lp, atol=2e-4)
        assert torch.allclose(torch.tensor(r.logq, dtype=torch.float64), lq, atol=2e-4)
        st = r.stats
        assert st["tokens_prefilled"] in (0, len(pr))  # 0: forked a sibling's prompt K/V
        assert st["positions_computed"] == (len(pr) - 1 if st["tokens_prefilled"] else 0) + st["tokens_sampled"]
        assert st["tokens_decoded"] == st["tokens_sampled"]
        blocks = math.ceil(len(r.token_ids) / 12) if not r.finished_by_eos else None
        if blocks is not None:
            assert r.proposed == 5 * blocks
            n_full += 1
        saw_accept |= r.accepted > 0
        saw_reject |= r.accepted < r.proposed
    assert saw_accept and saw_reject and n_full >= 1
    tot = s.last_stats
    # each prompt prefilled once: its second sample forks the first one's K/V
    assert tot["tokens_prefilled"] == sum(len(p) for p in prompts)
    assert all(sum(r.stats["tokens_prefilled"] for r in res if r.prompt_index == i) == len(p)
               for i, p in enumerate(prompts))
    assert tot["proposed"] == sum(r.proposed for r in res)


def test_sampled_token_count_matches_algorithm(tiny, monkeypatch):
    """tokens_sampled equals extension + proposal suffix lengths, counted independently by
    watching every MH decision (t, t', cut) the sampler makes."""
    model, _ = tiny
    from powersample_fast import ops

    seen = []
    orig = ops.mh_accept_

    def spy(cur_tok, cur_lp, cur_lq, cur_len, prop_tok, prop_lp, prop_lq, prop_len, rows, cut, base, log_u, alpha):
        for r, m in zip(rows.tolist(), cut.tolist()):
            seen.append((r, m, int(cur_len[r]), int(prop_len[r])))
        return orig(cur_tok, cur_lp, cur_lq, cur_len, prop_tok, prop_lp, prop_lq, prop_len, rows, cut, base, log_u, alpha)

    monkeypatch.setattr(ops, "mh_accept_", spy)
    s = PowerSampler(model, eos_token_ids=[])  # no EOS: every state has length L_k
    r = s.generate([[4, 5, 6]], alpha=2.0, max_new_tokens=30, block_size=8, mcmc_steps=3, seed=1,
                   progress=False)[0]
    assert len(r.token_ids) == 30 and not r.finished_by_eos
    proposal_tokens = sum(t2 - m for _, m, _, t2 in seen)
    assert len(seen) == 3 * 4  # ceil(30/8) = 4 stages (the last one 6 tokens long)
    assert all(t2 == t for _, _, t, t2 in seen)  # no EOS: proposals end at the stage limit
    assert r.stats["tokens_sampled"] == 30 + proposal_tokens


@pytest.mark.slow  # 2-5 s
def test_batch_composition_independence(tiny):
    model, _ = tiny
    s = PowerSampler(model)
    prompts = [[1, 2, 3], [4, 5], [6, 6, 6, 6]]
    kw = dict(alpha=3.0, max_new_tokens=24, block_size=8, mcmc_steps=3, n=2, seed=11, progress=False)
    a = s.generate(prompts, max_batch=1, **kw)
    b = s.generate(prompts, max_batch=4, **kw)
    c = s.generate(prompts[:1], max_batch=2, **kw)  # prompt 0 alone, other batch: same chains
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.accepted for r in a] == [r.accepted for r in b]
    # same seed -> same outputs; a different seed differs
    d = s.generate(prompts, max_batch=4, **dict(kw, seed=12))
    assert [r.token_ids for r in d] != [r.token_ids for r in a]
    assert [r.token_ids for r in c] == [r.token_ids for r in a[:2]]


def test_alpha1_tau1_accepts_everything_without_eos(tiny):
    model, _ = tiny
    s = PowerSampler(model, eos_token_ids=[])
    res = s.generate([[1, 2]], alpha=1.0, proposal_temperature=1.0, max_new_tokens=20, block_size=5,
                     mcmc_steps=4, n=3, seed=0, progress=False)
    for r in res:
        assert r.proposed == 16 and r.accepted == 16
        assert r.logp == pytest.approx(r.logq, abs=1e-6)


def test_top_k_restricts_proposals(tiny):
    model, _ = tiny
    s = PowerSampler(model)
    r = s.generate([[1, 2, 3]], alpha=4.0, top_k=3, max_new_tokens=16, block_size=8, mcmc_steps=2, seed=0,
                   progress=False)[0]
    ids = torch.tensor([[1, 2, 3] + r.token_ids])
    z = model(ids)[0, 2:-1]
    top3 = z.topk(3, dim=-1).indices
    assert all(t in top3[i].tolist() for i, t in enumerate(r.token_ids))
    # lq is the log-prob under the renormalised top-k proposal
    zt = (z / 0.25).masked_fill(z < z.topk(3, -1).values[:, -1:], float("-inf"))
    lq = torch.log_softmax(zt, -1).gather(1, torch.tensor(r.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(r.logq), lq, atol=2e-4)


def test_last_block_index_mode(tiny, monkeypatch):
    """Cuts fall inside the current block only: (k-1)*B <= m < t, with the index term's offset."""
    from powersample_fast import ops

    model, _ = tiny
    seen = []
    orig = ops.mh_accept_

    def spy(cur_tok, cur_lp, cur_lq, cur_len, prop_tok, prop_lp, prop_lq, prop_len, rows, cut, base, log_u, alpha):
        for r, m, b0 in zip(rows.tolist(), cut.tolist(), base.tolist()):
            seen.append((m, b0, int(cur_len[r])))
        return orig(cur_tok, cur_lp, cur_lq, cur_len, prop_tok, prop_lp, prop_lq, prop_len, rows, cut, base, log_u, alpha)

    monkeypatch.setattr(ops, "mh_accept_", spy)
    s = PowerSampler(model, eos_token_ids=[])
    r = s.generate([[1, 2]], index="last_block", max_new_tokens=20, block_size=6, mcmc_steps=3, seed=0,
                   progress=False)[0]
    assert len(r.token_ids) == 20 and r.proposed == 12
    assert sorted({b0 for _, b0, _ in seen}) == [0, 6, 12, 18]  # (k-1)*B for k = 1..4
    assert all(b0 <= m < t for m, b0, t in seen)
    assert any(m >= 6 for m, _, _ in seen) and not any(m < b0 for m, b0, _ in seen)


def test_several_eos_ids(tiny):
    model, _ = tiny
    res = PowerSampler(model, eos_token_ids=[7, 11, 13]).generate(
        [[1, 2]], max_new_tokens=40, block_size=10, mcmc_steps=2, n=12, seed=3, progress=False)
    ends = {r.token_ids[-1] for r in res if r.finished_by_eos}
    assert ends and ends <= {7, 11, 13}
    for r in res:
        assert not {7, 11, 13} & set(r.token_ids[:-1])
        assert r.finished_by_eos == (r.token_ids[-1] in {7, 11, 13})


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=0.0), "alpha must be"),
    (dict(alpha=-1.0), "alpha must be"),
    (dict(alpha=float("nan")), "alpha must be"),
    (dict(block_size=0), "block_size"),
    (dict(mcmc_steps=-1), "mcmc_steps"),
    (dict(n=0), "n \\(samples per prompt\\)"),
    (dict(top_k=0), "top_k"),
    (dict(index="middle"), "unknown index mode"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(proposal_temperature=0.0), "proposal_temperature"),
    (dict(max_new_tokens=250), "exceeds the model's context"),
    (dict(max_batch=0), "max_batch"),
])
def test_bad_arguments(tiny, kw, match):
    model, _ = tiny
    with pytest.raises(ConfigError, match=match):
        PowerSampler(model).generate([[1, 2, 3, 4, 5, 6, 7]], progress=False, **dict(dict(max_new_tokens=8), **kw))


@pytest.mark.parametrize("prompts,match", [([], "empty"), ([[]], "empty token list"), ("", "empty"),
                                           (["hi"], "tokenizer is needed"), ([3.5], "string or a list"),
                                           ([[1, 61]], "outside the vocabulary"), ([[-1]], "outside the vocabulary")])
def test_bad_prompts(tiny, prompts, match):
    model, _ = tiny
    with pytest.raises(ConfigError, match=match):
        PowerSampler(model).generate(prompts, max_new_tokens=4, progress=False)


def test_non_finite_logits_names_the_chain(tiny, tmp_path):
    model, _ = tiny
    bad = PowerSampler(model)
    w = model.norm.weight
    saved = w.clone()
    try:
        w[3] = float("nan")
        with pytest.raises(NonFiniteLogitsError, match=r"chain \(prompt 0, sample 0\)"):
            bad.generate([[1, 2]], max_new_tokens=4, progress=False)
    finally:
        w.copy_(saved)


def test_wrong_model_type():
    with pytest.raises(ConfigError, match="needs a powersample_fast Transformer"):
        PowerSampler(object())


def test_paper_drop_in_with_hf_model(tiny):
    """The reference's signature and return values, given an HF model: same weights on our engine."""
    from powersample_fast.entrypoints.paper import mcmc_power_samp

    ours, hf = tiny
    p = SimpleNamespace(model=hf, tokenizer=None)
    ctx = [1, 2, 3]
    gen, lq, target, ratio = mcmc_power_samp(p, ctx, temp=0.25, mcmc_steps=2, max_new_tokens=16, block_num=4, seed=0)
    assert gen[:3] == ctx and len(gen) - 3 == len(lq) == len(target)
    assert 0.0 <= ratio <= 1.0
    lp, lq_ref = _recompute_logprobs(ours, ctx, gen[3:], 0.25)
    assert torch.allclose(torch.tensor(target, dtype=torch.float64), 4.0 * lp, atol=1e-3)
    assert torch.allclose(torch.tensor(lq, dtype=torch.float64), lq_ref, atol=2e-4)
    with pytest.raises(ConfigError, match="temp must be > 0"):
        mcmc_power_samp(p, ctx, temp=0, mcmc_steps=1, max_new_tokens=4)


def test_static_decode_path_equals_eager(tiny):
    """The shape-static step that CUDA graphs capture (padded batch, bucketed KV length, device-side
    RoPE choice), run eagerly on CPU, gives the same chains as the default path."""
    model, _ = tiny
    kw = dict(alpha=3.0, max_new_tokens=40, block_size=10, mcmc_steps=3, n=3, seed=4, progress=False, max_batch=5)
    a = PowerSampler(model).generate([[1, 2, 3], [5, 6]], **kw)
    s = PowerSampler(model, cuda_graphs=True)
    b = s.generate([[1, 2, 3], [5, 6]], **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    for ra, rb in zip(a, b):
        assert ra.logp == pytest.approx(rb.logp, abs=1e-5)
        prefilled = rb.stats["prompt_tokens"] - 1 if rb.stats["tokens_prefilled"] else 0
        assert rb.stats["positions_computed"] == prefilled + rb.stats["tokens_sampled"]


def test_tail_compaction_moves_chains_without_changing_them(tiny):
    """Once the queue is drained, chains move down into freed slots (K/V, proposal backup, buffers
    and random stream move with them): outputs equal those of a run without moves."""
    model, _ = tiny
    kw = dict(alpha=3.0, max_new_tokens=48, block_size=12, mcmc_steps=3, n=4, seed=9, progress=False, max_batch=6)
    s = PowerSampler(model)
    a = s.generate([[1, 2, 3], [5, 6]], **kw)
    assert s.last_stats["slot_moves"] > 0
    s.compact = False
    b = s.generate([[1, 2, 3], [5, 6]], **kw)
    assert s.last_stats["slot_moves"] == 0
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.accepted for r in a] == [r.accepted for r in b]
    for r in a:  # and the moved chains' log-probs are still those of their final sequences
        lp, lq = _recompute_logprobs(model, [[1, 2, 3], [5, 6]][r.prompt_index], r.token_ids, 1 / 3.0)
        assert torch.allclose(torch.tensor(r.logp, dtype=torch.float64), lp, atol=2e-4)


def test_prompt_kv_shared_between_samples(tiny):
    """Samples of one prompt fork the prompt K/V of a sibling (or reuse their slot's) instead of
    prefilling again, also when slots are refilled from the queue and chains are moved."""
    model, _ = tiny
    s = PowerSampler(model)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]
    res = s.generate(prompts, alpha=2.0, max_new_tokens=30, block_size=6, mcmc_steps=2, n=5, seed=2,
                     progress=False, max_batch=3)
    assert s.last_stats["tokens_prefilled"] == sum(map(len, prompts))  # one prefill per prompt
    for r in res:
        lp, _ = _recompute_logprobs(model, prompts[r.prompt_index], r.token_ids, 0.5)
        assert torch.allclose(torch.tensor(r.logp, dtype=torch.float64), lp, atol=2e-4)


def test_batch_fits_free_memory(tiny, monkeypatch):
    """max_batch shrinks (with a warning) to what the KV cache can hold; a single chain that cannot
    fit is a clear error."""
    import powersample_fast.engine.kv_manager as smod

    model, _ = tiny
    cfg = model.config
    per_slot = 2 * (3 + 20) * 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 + 2 * 20 * 16
    monkeypatch.setattr(smod, "free_memory_bytes", lambda dev: int(3.5 * per_slot / 0.9))
    s = PowerSampler(model)
    with pytest.warns(UserWarning, match="max_batch reduced from 6 to 3"):
        res = s.generate([[1, 2, 3]], n=6, max_new_tokens=20, block_size=10, mcmc_steps=1, seed=0,
                         progress=False, max_batch=6)
    assert len(res) == 6 and s.last_stats["batch_slots"] == 3
    monkeypatch.setattr(smod, "free_memory_bytes", lambda dev: per_slot // 2)
    with pytest.raises(ConfigError, match="one chain needs .* GiB of KV cache"):
        s.generate([[1, 2, 3]], max_new_tokens=20, progress=False)


def test_token_id_tensor_prompts(tiny):
    model, _ = tiny
    kw = dict(max_new_tokens=6, block_size=3, mcmc_steps=1, seed=0, progress=False)
    a = PowerSampler(model).generate([[1, 2, 3], [4, 5, 6]], **kw)
    b = PowerSampler(model).generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), **kw)
    c = PowerSampler(model).generate(torch.tensor([1, 2, 3]), **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert c[0].token_ids == a[0].token_ids


def test_per_sample_phase_times_add_up(tiny):
    model, _ = tiny
    s = PowerSampler(model)
    res = s.generate([[1, 2, 3], [4, 5]], max_new_tokens=30, block_size=8, mcmc_steps=3, n=2, seed=5,
                     progress=False, max_batch=3)
    for k in ("prefill_s", "decode_s", "accept_s", "kv_copy_s"):
        assert all(r.stats[k] >= 0 for r in res)
        assert sum(r.stats[k] for r in res) == pytest.approx(s.last_stats[k], rel=1e-9, abs=1e-12)
    assert all(r.stats["decode_s"] > 0 for r in res)
