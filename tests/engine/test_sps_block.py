"""Scalable Power Sampling, block level (`method="sps"`, engine/policies/sps_block.py): the jackknife over
blocks against a direct computation, parameters and rows, every block's K/V against a from-scratch
forward, sequential steps and row-steps per block, admission when rows are short, forks copying only
new positions, the CLI flag. Its law on the enumerable toy: laws/test_sps_block_law.py."""
import json

import numpy as np
import pytest
import torch

import powersample_fast as pf
from powersample_fast.engine import Engine
from powersample_fast.engine.kv_cache import KVCache
from powersample_fast.engine.policies import get_policy
from powersample_fast.engine.policies import sps_block as blk
from powersample_fast.engine.policies.sps_token import jackknife_probs
from powersample_fast.entrypoints.cli import main as cli
from powersample_fast.errors import ConfigError
from powersample_fast.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tiny):
    """The tiny random Llama of conftest (vocab 61, EOS 7)."""
    return tiny[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Tiny random Llama + a tokenizer (helpers.tiny_models), for the CLI."""
    from helpers.tiny_models import make_cli_model_dir

    return make_cli_model_dir(tmp_path_factory.mktemp("cli_model"))


# ---------------------------------------------------------------------------------------------- arithmetic
def test_jackknife_over_blocks_matches_a_direct_computation():
    """p^JK over candidate blocks (their summed log p, rollout sums, zeta = 1 for EOS-ended blocks) against
    the issue's formulas computed directly in probability space: p_hat(b) ∝ exp(alpha lp(b)) zeta_hat(b),
    zeta_hat(b) = mean_r exp((alpha-1) f_br), p^(-s) the same without rollout s, p_JK = M p_hat -
    ((M-1)/M) sum_s p^(-s), clipped at 0 and renormalised."""
    rng = np.random.default_rng(1)
    for K, M, a in ((6, 8, 4.0), (3, 2, 2.5), (5, 5, 1.0)):
        lp = -rng.uniform(1, 30, size=K)                     # block log-likelihoods
        f = -rng.uniform(0, 20, size=(K, M))                 # rollout log-likelihoods
        rolled = rng.random(K) < 0.7
        rolled[0] = True

        def p_hat(cols):
            zeta = np.array([np.mean(np.exp((a - 1) * f[b, cols])) if rolled[b] else 1.0 for b in range(K)])
            w = np.exp(a * lp) * zeta
            return w / w.sum()

        jk = M * p_hat(list(range(M))) - (M - 1) / M * sum(p_hat([r for r in range(M) if r != s]) for s in range(M))
        clipped = bool((jk < 0).any())
        want = np.clip(jk, 0, None) / np.clip(jk, 0, None).sum()
        got, got_clipped = jackknife_probs(a, lp, f, rolled)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)
        assert got_clipped == clipped
    # log space: block log-likelihoods of -3000 (exp underflows in a direct computation) give the same
    got, _ = jackknife_probs(4.0, lp - 3000.0, f, rolled)
    np.testing.assert_allclose(got, jackknife_probs(4.0, lp, f, rolled)[0], rtol=1e-9)


def test_common_prefix():
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = list(rng.integers(0, 3, size=rng.integers(0, 12)))
        b = a[:rng.integers(0, len(a) + 1)] + list(rng.integers(0, 3, size=rng.integers(0, 5)))
        want = next((i for i, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b)))
        assert blk.common_prefix(a, b) == want


# ---------------------------------------------------------------------------------------------- parameters
def test_rows_and_plan():
    p = SamplingParams(method="sps")
    assert (p.sps_candidates, p.sps_top_k, p.sps_rollouts, p.sps_horizon, p.block_size) == (64, 8, 8, 192, 192)
    pol = get_policy("sps")
    assert pol.rows(p) == (64, 0)
    assert pol.rows(SamplingParams(method="sps", sps_candidates=16, sps_top_k=4, sps_rollouts=8)) == (32, 0)
    assert pol.rows(SamplingParams(method="sps", sps_candidates=16, sps_top_k=4, sps_horizon=0)) == (16, 0)
    assert pol.rows(SamplingParams(method="sps", sps_candidates=16, sps_top_k=4, max_new_tokens=192)) == (16, 0)
    assert get_policy("sps_token").rows(p) == (65, 0)
    q = SamplingParams(method="sps", max_new_tokens=10, block_size=4, sps_candidates=3, sps_top_k=2,
                       sps_rollouts=5, sps_horizon=3)
    assert pol.planned_tokens(q) == 3 * (4 + 4 + 2) + 2 * 5 * (3 + 2)


@pytest.mark.parametrize("kw,match", [
    (dict(sps_candidates=0), r"sps_candidates \(L, sps candidate blocks per block\) must be an integer >= 1 \(got 0\)"),
    (dict(sps_candidates=4), r"sps_top_k \(K = 8\) must be at most sps_candidates \(L = 4\)"),
    (dict(sps_top_k=0), r"sps_top_k \(K, sps candidates per block or token\) must be an integer >= 1"),
    (dict(top_k=5), "top_k does not apply to method 'sps'"),
    (dict(method="sps_token", top_k=5), "top_k does not apply to method 'sps_token'"),
    (dict(method="beam"), "unknown method 'beam'; choose one of plain, mh, smc, sps, sps_token"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**dict(dict(method="sps"), **kw))


def test_sps_token_ignores_the_block_parameters():
    SamplingParams(method="sps_token", sps_candidates=1)  # K > L is only an error for the block level


# ---------------------------------------------------------------------------------------------- engine
def _forward_lp(model, ctx, toks):
    """Per-token log p of `toks` after `ctx` from a from-scratch forward (no cache)."""
    z = model(torch.tensor([ctx + toks[:-1]]))[0, len(ctx) - 1:].double()
    return torch.log_softmax(z, -1).gather(1, torch.tensor(toks)[:, None])[:, 0]


@pytest.mark.parametrize("L,K,M,H", [(6, 3, 2, 4), (3, 2, 4, 9), (8, 2, 2, 4)])
def test_every_block_decodes_on_the_right_kv(tiny_model, monkeypatch, L, K, M, H):
    """At every decision: each candidate block's per-token log p and each rollout's summed log p equal a
    from-scratch forward of prompt + kept prefix (+ block), and every row's length matches the tokens it is
    tracked to hold; after it, the kept prefix's logp equal a from-scratch forward. So the forks (prefix ->
    candidates, copying only positions after the common prefix; candidate -> rollouts) and the prefix kept
    in the chosen candidate's row are right. (L, K, M) = (3, 2, 4): more rollout rows than candidates; (8, 2, 2):
    fewer, candidates above the rollout rows stay held and all their rollouts are forked."""
    checked = {"cand": 0, "roll": 0, "kept": 0}
    orig = blk.BlockSPSPolicy._decide

    def spy(self, eng, g):
        st, P = g.state, len(g.prompt)
        ctx = g.prompt + st.x
        for s in g.seqs:
            assert eng.kv.lengths[s.row] == P - 1 + len(st.held[s])
        for c in st.G:
            toks = list(c.tokens)
            assert torch.allclose(torch.tensor(c.token_lp, dtype=torch.float64), _forward_lp(tiny_model, ctx, toks),
                                  atol=2e-4)
            checked["cand"] += 1
        for s, (ci, r) in st.role.items():
            want = _forward_lp(tiny_model, ctx + list(st.G[ci].tokens), s.tokens).sum().item()
            assert st.f[ci, r] == pytest.approx(want, abs=5e-4)
            checked["roll"] += 1
        out = orig(self, eng, g)
        lp = _forward_lp(tiny_model, g.prompt, st.x)
        assert torch.allclose(torch.tensor(st.lp, dtype=torch.float64), lp, atol=2e-4)
        checked["kept"] += 1
        return out

    monkeypatch.setattr(blk.BlockSPSPolicy, "_decide", spy)
    s = pf.PowerSampler(tiny_model)
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    res = s.generate(prompts, method="sps", block_size=3, sps_candidates=L, sps_top_k=K, sps_rollouts=M,
                     sps_horizon=H, max_new_tokens=11, n=2, seed=2, progress=False, max_batch=24)
    assert checked["cand"] >= 20 and checked["roll"] >= 40 and checked["kept"] >= 12
    for r in res:
        ctx = prompts[r.prompt_index]
        assert torch.allclose(torch.tensor(r.logp, dtype=torch.float64), _forward_lp(tiny_model, ctx, r.token_ids),
                              atol=2e-4)
        # logq: log p^JK of each block on its last token, 0 elsewhere
        ends = set(range(2, len(r.token_ids) - 1, 3)) | {len(r.token_ids) - 1}
        assert all(q == 0.0 for i, q in enumerate(r.logq) if i not in ends)
        assert all(r.logq[i] <= 1e-9 for i in ends)
        assert r.extra["blocks"] == len(ends) == len(r.extra["distinct_candidates"])
        assert r.extra["rollout_tokens"] > 0
    assert s.last_stats["kv_copy_launches"] <= s.last_stats["decode_steps"]


@pytest.mark.parametrize("L,K,M", [(2, 2, 4), (8, 2, 2)])
def test_sequential_steps_and_rows(tiny_model, L, K, M):
    """EOS off, one sample: n + h decode steps per block (candidates, then rollouts), against 1 + h per token
    for sps_token and 1 for plain. Each phase runs in the group's lowest rows (L for candidates, |G|*M for
    rollouts), so the step skips the rest of the max(L, K*M) rows (engine stats row_steps and
    row_steps_skipped, exact here)."""
    s = pf.PowerSampler(tiny_model, eos_token_ids=[])
    T_, B_, H, R = 10, 4, 3, max(L, K * M)
    r = s.generate([[3, 4]], method="sps", max_new_tokens=T_, block_size=B_, sps_candidates=L, sps_top_k=K,
                   sps_rollouts=M, sps_horizon=H, seed=0, progress=False)[0]
    st = s.last_stats
    blocks = [(min(B_, T_ - t), min(H, T_ - t - min(B_, T_ - t))) for t in range(0, T_, B_)]  # (n, h)
    assert blocks == [(4, 3), (4, 2), (2, 0)] and len(r.token_ids) == T_
    assert st["decode_steps"] == sum(n + h for n, h in blocks) == 15
    assert r.extra["distinct_candidates"] == [L, L, L]
    assert st["batch_slots"] == R
    assert st["row_steps"] == sum(n * L + h * K * M for n, h in blocks)
    assert st["row_steps_skipped"] == sum(n * (R - L) + h * (R - K * M) for n, h in blocks)
    assert r.extra["candidate_tokens"] == L * T_ and r.extra["rollout_tokens"] == K * M * (3 + 2)
    # token level: one prefix step + h rollout steps per token
    s.generate([[3, 4]], method="sps_token", max_new_tokens=T_, sps_top_k=2, sps_rollouts=2, sps_horizon=H, seed=0,
               progress=False)
    assert s.last_stats["decode_steps"] == sum(1 + min(H, T_ - t - 1) for t in range(T_))
    s.generate([[3, 4]], method="plain", max_new_tokens=T_, seed=0, progress=False)
    assert s.last_stats["decode_steps"] == T_


def test_fewer_samples_at_a_time_when_rows_are_short(tiny_model):
    """A sample holds max(L, K*M) rows from admission to its end; an engine with room for one sample runs
    them one after the other (never fails mid-request), and a result does not depend on the batch."""
    kw = dict(method="sps", block_size=3, sps_candidates=4, sps_top_k=2, sps_rollouts=3, sps_horizon=2,
              max_new_tokens=7, n=3, seed=5, progress=False)
    s = pf.PowerSampler(tiny_model)
    one = s.generate([[1, 2, 3]], max_batch=7, **kw)
    assert s.last_stats["batch_slots"] == 6 and s.last_stats["max_batch_rows"] <= 6
    many = s.generate([[1, 2, 3]], max_batch=64, **kw)
    assert s.last_stats["max_batch_rows"] > 6
    assert [r.token_ids for r in one] == [r.token_ids for r in many]
    eng = Engine(tiny_model, max_batch=5, max_len=16, store_rows=0)
    with pytest.raises(ConfigError, match="method 'sps' needs 6 decode and 0 store rows"):
        eng.add_request([1, 2], SamplingParams(**{k: v for k, v in kw.items() if k != "progress"}))


def test_forks_copy_only_new_positions(tiny_model, monkeypatch):
    """After the prompt's fork at admission (positions [0, P-1) into every row), no copy starts inside the
    prompt: a fork copies only the positions after what the destination row already shares with the source
    (about one block per row per phase), never the prefix again."""
    copies = []
    orig = KVCache._copy

    def spy(self, src, dst, start, length):
        copies.extend(zip(start, length))
        return orig(self, src, dst, start, length)

    monkeypatch.setattr(KVCache, "_copy", spy)
    P, T_, B_, L, K, M = 40, 16, 3, 4, 2, 3
    s = pf.PowerSampler(tiny_model, eos_token_ids=[])
    r = s.generate([list(range(10, 10 + P))], method="sps", max_new_tokens=T_, block_size=B_, sps_candidates=L,
                   sps_top_k=K, sps_rollouts=M, sps_horizon=4, seed=1, progress=False)[0]
    R, blocks = max(L, K * M), -(-T_ // B_)
    assert len(r.token_ids) == T_ and r.extra["blocks"] == blocks
    assert copies[:R - 1] == [(0, P - 1)] * (R - 1)  # admission: the prompt into the other rows
    later = copies[R - 1:]
    assert later and all(start >= P - 1 for start, _ in later)
    total = sum(n for _, n in later)
    assert total <= blocks * R * (B_ + 1), total  # full forks would copy >= P - 1 positions per row and phase


@pytest.mark.slow
def test_defaults_run_on_the_default_model():
    """L = 64, K = M = 8, B = H = 192 on SmolLM2-135M with a 4-token budget (one final block: the 64
    candidates, no rollouts): it runs and results are well formed."""
    from powersample_fast.models import default_model as hub

    model, tok = pf.load(hub.default_model_dir(progress=False))
    s = pf.PowerSampler(model, tok)
    r = s.generate("2+2=", method="sps", max_new_tokens=4, seed=0, progress=False, chat=False)[0]
    assert 1 <= len(r.token_ids) <= 4 and r.method == "sps" and r.extra["blocks"] == 1
    assert s.last_stats["batch_slots"] == 64 and r.extra["rollout_tokens"] == 0


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_sps_candidates_flag(model_dir, capsys):
    """--sps-candidates comes from the one sampling-flag table; K > L is a one-line error."""
    rc = cli.main(["sample", "--model", str(model_dir), "--prompt", "hello", "--method", "sps", "--max-new-tokens", "5",
                   "--block-size", "2", "--sps-candidates", "3", "--sps-top-k", "2", "--sps-rollouts", "2",
                   "--sps-horizon", "2", "--seed", "0", "--json", "--no-progress"])
    assert rc == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert row["method"] == "sps" and row["sps_candidates"] == 3 and row["extra"]["blocks"] >= 1
    rc = cli.main(["sample", "--model", str(model_dir), "--prompt", "hi", "--method", "sps", "--sps-candidates", "2",
                   "--max-new-tokens", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "sps_top_k (K = 8) must be at most sps_candidates (L = 2)" in err
