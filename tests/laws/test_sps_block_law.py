"""The law of Scalable Power Sampling, block level (`method="sps"`, engine/policies/sps_block.py), on
the default enumerable toy (vocab 4, EOS 3, prompt [0, 1], T = 4 new tokens, alpha 4) in blocks of
B = 2: the first block has 13 distinct values ((3,), (a, 3), (a, b) for a, b in {0, 1, 2}), the
second is the final block (no future: zeta = 1). With K = 1 and no rollouts the law is exact
(`top1_law`, order statistics of the L candidates); with rollouts it is computed by simulation.

The law of the algorithm is computed here independently of the sampler (`block_sps_law`): per
block-start prefix, R simulated decisions, each drawing the L candidates from the exact block law,
taking the top-K distinct by (log p, tokens), drawing M rollouts per candidate from the exact law
of the rollout's summed log p, and averaging p^JK (its own vectorised arithmetic, not the policy's).

Bias at the test's setting (K = 13 >= 13 distinct blocks, L = 64, M = 8, H = 4 >= T: to the end),
stated and asserted in `test_approaches_power_law`:
  - candidates: given the set S of distinct candidates, the exact-zeta decision is pi restricted to
    S, at TV pi(S^c) from pi; so the L term is at most sum_b pi_1(b) (1 - p(b))^L over first blocks
    b (pi_1: pi's first-block marginal; p(b): its probability under p), 3.2e-5 at L = 64;
  - jackknife (finite M): TV(law, pi) of the computed law, 0.0014 at M = 8 (the same computation
    gives 0.021 at M = 2, 0.005 at M = 4, 0.0002 at M = 16, 0.10 at M = 1: the O(1/M^2) decay of
    the jackknife), with a Monte Carlo error of about 0.001 (R = 20000; seed-to-seed TV);
  so the bias bound at this setting is 0.005, and the samples' TV to pi must stay below the 99.9%
  quantile of the TV between pi and as many exact draws from the computed law (which includes
  the bias). H = 0 (zeta forced to 1: block-level low-temperature sampling over the candidates)
  is at TV 0.24 from pi and the same samples test rejects it.
"""
import numpy as np
import pytest
import torch

import powersample_fast as pf
from helpers.laws import (ALPHA, EOS, P_MIN, PROMPT, T, chi_square_pvalue, counts_of, exact_power_law, sample_law,
                          toy_tree, tv)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
B = 2


# ---------------------------------------------------------------------------------------------- laws
def _paths(tree, x, n):
    """(tokens, summed log p) of every continuation of x of at most n tokens ending with EOS or at n."""
    out, level = [], [((), 0.0)]
    for depth in range(n):
        nxt = []
        for f, s in level:
            lp = torch.log_softmax(tree.logits[x + f], -1).numpy()
            for v in range(tree.vocab_size):
                g = (f + (v,), s + float(lp[v]))
                (out if v in tree.eos or depth + 1 == n else nxt).append(g)
        level = nxt
    return out


def _lme(v, axis):
    m = v.max(axis, keepdims=True)
    return (m + np.log(np.exp(v - m).mean(axis, keepdims=True))).squeeze(axis)


def block_sps_law(tree, *, alpha, block_size, candidates, top_k, rollouts, horizon, reps=20000, seed=0):
    """The law of block SPS over final states (module doc), by simulating `reps` decisions per prefix."""
    rng = np.random.default_rng(seed)
    T_, M, L, K = tree.max_new_tokens, rollouts, candidates, top_k
    law, todo = {}, [((), 1.0)]
    while todo:
        x, px = todo.pop()
        t = len(x)
        bl = sorted(_paths(tree, x, min(block_size, T_ - t)), key=lambda e: (-e[1], e[0]))  # G's order
        lp = np.array([s for _, s in bl])
        present = rng.multinomial(L, np.exp(lp) / np.exp(lp).sum(), size=reps) > 0   # [reps, blocks]
        in_g = present & (np.cumsum(present, 1) <= K)
        g = np.zeros((reps, len(bl), M))
        rolled = np.zeros(len(bl), bool)
        for j, (b, _) in enumerate(bl):
            h = min(horizon, T_ - t - len(b))
            if h > 0 and b[-1] not in tree.eos:
                rolled[j] = True
                fut = _paths(tree, x + b, h)
                fp, fs = np.exp([s for _, s in fut]), np.array([s for _, s in fut])
                g[:, j] = (alpha - 1) * fs[rng.choice(len(fut), size=(reps, M), p=fp / fp.sum())]

        def probs(lz):  # lz [reps, (M,) blocks] -> p over G (0 outside)
            mask = in_g[:, None] if lz.ndim == 3 else in_g
            a = np.where(mask, alpha * lp + lz, -np.inf)
            e = np.exp(a - a.max(-1, keepdims=True))
            return e / e.sum(-1, keepdims=True)

        p = probs(np.where(rolled, _lme(g, 2), 0.0))
        if M > 1 and rolled.any():
            loo = np.stack([_lme(np.delete(g, s, 2), 2) for s in range(M)], 1)       # [reps, M, blocks]
            jk = np.clip(M * p - (M - 1) / M * probs(np.where(rolled, loo, 0.0)).sum(1), 0, None)
            p = jk / jk.sum(-1, keepdims=True)
        for (b, _), q in zip(bl, p.mean(0)):
            if q > 0:
                y = x + b
                if b[-1] in tree.eos or len(y) >= T_:
                    law[y] = law.get(y, 0.0) + px * q
                else:
                    todo.append((y, px * q))
    return law


def top1_law(tree, *, block_size, candidates):
    """Exact law with K = 1 and no rollouts: per block, the most likely (log p, then tokens) of L draws.
    P(b) = (1 - F(before b))^L - (1 - F(up to b))^L with F the p-mass of the blocks ranked first."""
    law, todo = {}, [((), 1.0)]
    while todo:
        x, px = todo.pop()
        bl = sorted(_paths(tree, x, min(block_size, tree.max_new_tokens - len(x))), key=lambda e: (-e[1], e[0]))
        F = np.concatenate([[0.0], np.cumsum(np.exp([s for _, s in bl]))])
        for j, (b, _) in enumerate(bl):
            q = (1 - F[j]) ** candidates - (1 - min(F[j + 1], 1.0)) ** candidates
            y = x + b
            if b[-1] in tree.eos or len(y) >= tree.max_new_tokens:
                law[y] = law.get(y, 0.0) + px * q
            elif q > 0:
                todo.append((y, px * q))
    return law


def _noise(law, n, seed=0):
    rng = np.random.default_rng(seed)
    return float(np.quantile([tv(law, sample_law(law, n, rng)) for _ in range(1000)], 0.999))


@pytest.fixture(scope="module")
def toy_sampler(toy_dir):
    model, _ = pf.load(toy_dir, device="cpu", dtype="float32")
    return pf.PowerSampler(model)


def _sps(sampler, n, seed, **kw):
    return sampler.generate(PROMPT, method="sps", alpha=ALPHA, max_new_tokens=T, block_size=B, n=n, seed=seed,
                            progress=False, max_batch=2048, **kw)


# ---------------------------------------------------------------------------------------------- tests
def test_top1_law_is_exact(toy_sampler, toy_dir):
    """K = 1, no rollouts (H = 0): each block is the most likely of L = 3 blocks sampled from p. Its exact
    law (order statistics of the candidates, `top1_law`) tests candidate sampling, distinctness, the
    ranking, the final block and the prefix hand-over between blocks, by chi-square."""
    res = _sps(toy_sampler, 600, 3, sps_candidates=3, sps_top_k=1, sps_horizon=0)
    law = top1_law(toy_tree(toy_dir, PROMPT, T, EOS), block_size=B, candidates=3)
    assert chi_square_pvalue(counts_of(r.token_ids for r in res), law) > P_MIN
    assert all(r.extra["rollout_tokens"] == 0 for r in res)


def test_approaches_power_law(toy_sampler, toy_dir):
    """K = 13 (every distinct first block), L = 64, M = 8, H = 4 (to the end): the samples follow the computed
    law (chi-square) and are within sampling noise + the bias bound (module doc: 0.005) of p^alpha; with
    zeta forced to 1 (H = 0: block low-temperature sampling) the same test rejects p^alpha."""
    n, n_low, L, K, M, H = 600, 400, 64, 13, 8, T
    tree = toy_tree(toy_dir, PROMPT, T, EOS)
    pi = exact_power_law(toy_dir, PROMPT, ALPHA, T, EOS)
    # the L term of the bias bound (module doc)
    first = _paths(tree, (), B)
    pb = np.exp([s for _, s in first])
    pi1 = np.array([sum(v for y, v in pi.items() if y[:len(b)] == b) for b, _ in first])
    assert len(first) == 13 and float(pi1 @ (1 - pb) ** L) < 1e-4
    law = block_sps_law(tree, alpha=ALPHA, block_size=B, candidates=L, top_k=K, rollouts=M, horizon=H)
    bias = tv(law, pi)
    assert bias < 0.005  # 0.0014 computed (MC error ~0.001)
    res = _sps(toy_sampler, n, 21, sps_candidates=L, sps_top_k=K, sps_rollouts=M, sps_horizon=H)
    counts = counts_of(r.token_ids for r in res)
    assert chi_square_pvalue(counts, law) > P_MIN
    noise = _noise(law, n)
    assert tv(pi, counts) < noise, (tv(pi, counts), noise, bias)
    assert max(max(r.extra["distinct_candidates"]) for r in res) >= 8
    # zeta forced to 1: H = 0 (no rollouts), everything else equal
    low = _sps(toy_sampler, n_low, 22, sps_candidates=L, sps_top_k=K, sps_rollouts=M, sps_horizon=0)
    low_counts = counts_of(r.token_ids for r in low)
    assert chi_square_pvalue(low_counts, pi) < 1e-6
    assert tv(pi, low_counts) > _noise(law, n_low)
    low_law = block_sps_law(tree, alpha=ALPHA, block_size=B, candidates=L, top_k=K, rollouts=M, horizon=0, reps=2000)
    assert tv(low_law, pi) > 0.2 and chi_square_pvalue(low_counts, low_law) > P_MIN
