"""Exact laws of the enumerable toys (built by tiny_models.py) for the distributional tests.

A toy model has a handful of tokens (one of them EOS) and the tests generate a few tokens, so every
final state of Algorithm 1 (ALGORITHM.md) can be listed and its probability computed exactly:

- ``exact_power_law``: pi(x) ∝ exp(alpha * sum_i lp_i), the target;
- ``proposal_law``: sequential sampling from softmax(z / tau) until EOS or the budget (the
  low-temperature law is ``proposal_law`` with tau = 1/alpha);
- ``mh_chain_law``: the exact law of Algorithm 1's output after N MH steps per stage, from its
  transition matrices, so a sampler can be tested exactly (chi-square) with few steps, and the
  step count of a "converged" test can be justified by a computed distance to pi, not by tuning;
- ``power_normaliser``: Z = sum_x p(x)^alpha (the SMC evidence);
- ``sps_token_law``: the law of token-level Scalable Power Sampling (top-K, M rollouts of horizon
  H, jackknife), its per-token expectation over the rollouts simulated from the exact rollout laws.

Sampling-noise yardsticks: ``tv_noise_reference`` (TV between a law and n exact draws from it) and
``chi_square_pvalue``. A law is a dict ``{tuple(generated token ids): probability}``.
"""
from __future__ import annotations

import copy
import math
import pathlib
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

State = Tuple[int, ...]
Law = Dict[State, float]
NextLogitsFn = Callable[[List[List[int]]], torch.Tensor]


def load_toy_model(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


def hf_next_logits_fn(model_or_dir, dtype=torch.float64) -> NextLogitsFn:
    """``fn(list of full token lists) -> [N, V]`` raw next-token logits from a full forward of an HF
    causal LM (a copy in ``dtype``, fp64 by default for the reference)."""
    if isinstance(model_or_dir, (str, pathlib.Path)):
        model = load_toy_model(model_or_dir, dtype=dtype)
    else:
        model = copy.deepcopy(model_or_dir).to(dtype).eval()

    @torch.no_grad()
    def fn(seqs: List[List[int]]) -> torch.Tensor:
        out = torch.empty(len(seqs), model.config.vocab_size, dtype=torch.float64)
        by_len: Dict[int, List[int]] = {}
        for i, s in enumerate(seqs):
            by_len.setdefault(len(s), []).append(i)
        for _, idx in by_len.items():
            ids = torch.tensor([seqs[i] for i in idx], dtype=torch.long)
            out[idx] = model(input_ids=ids).logits[:, -1, :].double()
        return out

    return fn


def _as_logits_fn(model) -> NextLogitsFn:
    if callable(model) and not isinstance(model, torch.nn.Module):
        return model
    return hf_next_logits_fn(model)


def _eos_set(eos_id) -> frozenset:
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, int):
        return frozenset([eos_id])
    return frozenset(int(e) for e in eos_id)


# ----------------------------------------------------------------------------------------------
# Enumeration
# ----------------------------------------------------------------------------------------------
class ToyTree:
    """Next-token logits of every non-final prefix (generated tokens only) up to ``max_new_tokens``.

    ``stop``: optional ``(token_texts, stop_strings)``: a sequence whose text (its tokens' texts
    concatenated) contains a stop string has ended, as if its last token were EOS (ALGORITHM.md
    "Stop strings")."""

    def __init__(self, next_logits_fn: NextLogitsFn, prompt: Sequence[int], max_new_tokens: int, eos_id,
                 stop: Optional[Tuple[Sequence[str], Sequence[str]]] = None):
        self.prompt = [int(t) for t in prompt]
        self.max_new_tokens = int(max_new_tokens)
        self.eos = _eos_set(eos_id)
        self.stop = stop
        self.logits: Dict[State, torch.Tensor] = {}  # prefix -> [V] fp64 raw logits
        level: List[State] = [()]
        for _ in range(self.max_new_tokens):
            z = next_logits_fn([self.prompt + list(p) for p in level]).double()
            self.vocab_size = z.shape[-1]
            nxt = []
            for p, zp in zip(level, z):
                self.logits[p] = zp
                nxt.extend(p + (v,) for v in range(self.vocab_size) if not self.ended(p + (v,)))
            level = nxt

    def states(self, limit: Optional[int] = None) -> List[State]:
        """Final states of a stage with limit L: length L and no EOS, or ending with the only EOS."""
        limit = self.max_new_tokens if limit is None else limit
        out = []
        for p in self.logits:
            if len(p) >= limit:
                continue
            for v in range(self.vocab_size):
                if self.ended(p + (v,)) or len(p) + 1 == limit:
                    out.append(p + (v,))
        return sorted(out, key=lambda s: (len(s), s))

    def ended(self, state: State) -> bool:
        """Ends with EOS, or (with ``stop``) its text contains a stop string."""
        if state and state[-1] in self.eos:
            return True
        if self.stop is None:
            return False
        texts, stops = self.stop
        text = "".join(texts[t] for t in state)
        return any(x in text for x in stops)

    def token_logprobs(self, state: State, tau: float = 1.0, top_k: Optional[int] = None) -> np.ndarray:
        """Per-token log-probs of ``state`` under softmax(topk(z) / tau) (lp: tau=1, no top-k)."""
        out = np.empty(len(state))
        for i, tok in enumerate(state):
            z = _mask_top_k(self.logits[state[:i]], top_k)
            out[i] = torch.log_softmax(z / tau, dim=-1)[tok].item()
        return out


def _mask_top_k(z: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    # HF's TopKLogitsWarper rule: drop logits strictly below the k-th largest (ties are kept).
    if top_k is None or top_k >= z.shape[-1]:
        return z
    kth = torch.topk(z, top_k).values[..., -1:]
    return z.masked_fill(z < kth, float("-inf"))


def enumerate_states(next_logprobs_fn: NextLogitsFn, prompt, max_new_tokens: int, eos_id) -> Dict[State, torch.Tensor]:
    """All final states ``{state: [t, V] raw logits of each of its positions}``.

    ``next_logprobs_fn(list of full token lists) -> [N, V]`` raw next-token logits. A final state has
    ``max_new_tokens`` tokens and no EOS, or ends with its only EOS.
    """
    tree = ToyTree(next_logprobs_fn, prompt, max_new_tokens, eos_id)
    return {s: torch.stack([tree.logits[s[:i]] for i in range(len(s))]) for s in tree.states()}


_TREE_CACHE: Dict[tuple, ToyTree] = {}


def toy_tree(model, prompt, max_new_tokens: int, eos_id, stop=None) -> ToyTree:
    """A (cached, for model dirs) ``ToyTree`` from a model dir, an HF model or a logits function
    (``stop``: see ``ToyTree``)."""
    key = None
    if isinstance(model, (str, pathlib.Path)):
        w = pathlib.Path(model).resolve() / "model.safetensors"
        stamp = (w.stat().st_mtime_ns, w.stat().st_size) if w.is_file() else None  # a rewritten dir is re-read
        key = (str(w.parent), stamp, tuple(prompt), int(max_new_tokens), _eos_set(eos_id),
               None if stop is None else (tuple(stop[0]), tuple(stop[1])))
        if key in _TREE_CACHE:
            return _TREE_CACHE[key]
    tree = ToyTree(_as_logits_fn(model), prompt, max_new_tokens, eos_id, stop)
    if key is not None:
        _TREE_CACHE[key] = tree
    return tree


# ----------------------------------------------------------------------------------------------
# Exact laws
# ----------------------------------------------------------------------------------------------
def _normalize(logw: Dict[State, float]) -> Law:
    m = max(logw.values())
    w = {s: math.exp(v - m) for s, v in logw.items() if v > float("-inf")}
    z = sum(w.values())
    return {s: v / z for s, v in w.items()}


def exact_power_law(model, prompt, alpha: float, max_new_tokens: int, eos_id, top_k: Optional[int] = None,
                    stop=None) -> Law:
    """pi(x) ∝ exp(alpha * sum_i log p(x_i | prefix)) over final states. With ``top_k`` the support is
    restricted to states whose every token is inside the top-k (the only ones a chain can reach)."""
    tree = toy_tree(model, prompt, max_new_tokens, eos_id, stop)
    logw = {}
    for s in tree.states():
        if top_k is not None and not np.all(np.isfinite(tree.token_logprobs(s, 1.0, top_k))):
            continue
        logw[s] = alpha * float(tree.token_logprobs(s).sum())
    return _normalize(logw)


def proposal_law(model, prompt, tau: float, max_new_tokens: int, eos_id, top_k: Optional[int] = None,
                 stop=None) -> Law:
    """Law of sequential sampling from softmax(topk(z) / tau) until EOS (or a stop string) or ``max_new_tokens``."""
    tree = toy_tree(model, prompt, max_new_tokens, eos_id, stop)
    law = {s: float(np.exp(tree.token_logprobs(s, tau, top_k).sum())) for s in tree.states()}
    return {s: p for s, p in law.items() if p > 0.0}


def low_temperature_law(model, prompt, alpha: float, max_new_tokens: int, eos_id) -> Law:
    return proposal_law(model, prompt, 1.0 / alpha, max_new_tokens, eos_id)


def mh_chain_law(
    model,
    prompt,
    *,
    alpha: float,
    max_new_tokens: int,
    block_size: int,
    mcmc_steps: int,
    eos_id,
    proposal_temperature: Optional[float] = None,
    top_k: Optional[int] = None,
    index: str = "uniform",
    early_stop: bool = False,
    matrix: Optional[Callable] = None,
    stop=None,
) -> Law:
    """Exact law of the output of Algorithm 1 (one chain) after ``mcmc_steps`` steps per stage.
    ``matrix(tree, states, pos, lp, lq, alpha, base)``: the one-step transition matrix of another MH
    variant (default: Algorithm 1's, ``_mh_matrix``; helpers/toy_mixing.py builds the mixing options').

    EOS (ALGORITHM.md step 3): a state that ends with EOS after stage k < K jumps to the final stage
    and runs its ``mcmc_steps`` steps (L_K = T) from there, so as mcmc_steps -> inf the law tends to
    pi. With ``early_stop=True`` (or index="last_block", or no MH steps) it stops there instead and
    keeps its stage-k weight pi_k: the paper's rule, computed here, not assumed. ``stop``: see
    ``ToyTree`` (a state that ends at a stop string is treated as EOS-ended)."""
    tree = toy_tree(model, prompt, max_new_tokens, eos_id, stop)
    tau = 1.0 / alpha if proposal_temperature is None else float(proposal_temperature)
    num_blocks = -(-max_new_tokens // block_size)
    stop_early = early_stop or index == "last_block" or mcmc_steps == 0
    final: Law = {}
    dist: Dict[State, float] = {(): 1.0}  # unfinished states entering the stage
    jumped: Dict[State, float] = {}  # EOS-ended states waiting for the final stage's steps
    for k in range(1, num_blocks + 1):
        limit = min(k * block_size, max_new_tokens)
        states = tree.states(limit)
        pos = {s: i for i, s in enumerate(states)}
        lp = [tree.token_logprobs(s) for s in states]
        lq = [tree.token_logprobs(s, tau, top_k) for s in states]
        # 1. extension of each entering state (jumped states enter the final stage as they are)
        v = np.zeros(len(states))
        for x, px in dist.items():
            for j, y in enumerate(states):
                if len(y) > len(x) and y[: len(x)] == x:
                    v[j] += px * math.exp(lq[j][len(x):].sum())
        if k == num_blocks:
            for x, px in jumped.items():
                v[pos[x]] += px
        # 2. N MH steps: v <- v P
        if mcmc_steps > 0:
            base = (k - 1) * block_size if index == "last_block" else 0
            P = (_mh_matrix(states, pos, lp, lq, alpha, base) if matrix is None
                 else matrix(tree, states, pos, lp, lq, alpha, base))
            v = v @ np.linalg.matrix_power(P, mcmc_steps)
        # 3. finished states leave (or jump); the rest enter the next stage
        dist = {}
        for j, s in enumerate(states):
            if v[j] <= 0.0:
                continue
            if k == num_blocks or (tree.ended(s) and stop_early):
                final[s] = final.get(s, 0.0) + float(v[j])
            elif tree.ended(s):
                jumped[s] = jumped.get(s, 0.0) + float(v[j])
            else:
                dist[s] = float(v[j])
    return final


def power_normaliser(model, prompt, alpha: float, max_new_tokens: int, eos_id) -> float:
    """Z = sum over final states of p(x)^alpha (what the SMC evidence estimate targets)."""
    tree = toy_tree(model, prompt, max_new_tokens, eos_id)
    return float(sum(math.exp(alpha * tree.token_logprobs(s).sum()) for s in tree.states()))


def sps_token_law(model, prompt, *, alpha: float, max_new_tokens: int, eos_id, top_k: int, rollouts: int,
                  horizon: int, reps: int = 20000, seed: int = 0) -> Law:
    """Law of Scalable Power Sampling (token level) over final states, computed independently of the
    sampler: at each prefix the token is drawn from p^JK, whose randomness is the rollouts', so the
    token law given the prefix is E[p^JK]; it is estimated here by ``reps`` simulated sets of M
    rollouts per candidate, drawn from the exact law of the rollout's summed log p (futures after
    (prefix, c) enumerated up to min(H, budget left) tokens). Candidates: the top-K by p; EOS
    candidates and h = 0 get zeta = 1. The final law is the product of these token laws. Monte
    Carlo error: ~0.5/sqrt(reps) per token probability at most (about 0.004 at the default)."""
    tree = toy_tree(model, prompt, max_new_tokens, eos_id)
    rng = np.random.default_rng(seed)
    T, M = tree.max_new_tokens, rollouts

    def futures(prefix: State, h: int):
        """(probability, summed log p) of every rollout of at most h tokens after prefix."""
        out, level = [], [((), 0.0)]
        for depth in range(h):
            nxt = []
            for f, s in level:
                lp = torch.log_softmax(tree.logits[prefix + f], -1).numpy()
                for v in range(tree.vocab_size):
                    g = (f + (v,), s + lp[v])
                    (out if v in tree.eos or depth + 1 == h else nxt).append(g)
            level = nxt
        return np.array([math.exp(s) for _, s in out]), np.array([s for _, s in out])

    def lme(x, axis):
        m = x.max(axis=axis, keepdims=True)
        return (m + np.log(np.exp(x - m).mean(axis=axis, keepdims=True))).squeeze(axis)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    token_law: Dict[State, Dict[int, float]] = {}
    for prefix, z in tree.logits.items():
        lp = torch.log_softmax(z, -1).numpy()
        cands = [int(c) for c in np.argsort(-lp, kind="stable")[:top_k]]
        h = min(horizon, T - len(prefix) - 1)
        a = alpha * lp[cands]
        g = np.zeros((reps, len(cands), M))   # (alpha - 1) * f for every rep, candidate, rollout
        rolled = np.array([h > 0 and c not in tree.eos for c in cands])
        for ci, c in enumerate(cands):
            if rolled[ci]:
                pr, fs = futures(prefix + (c,), h)
                g[:, ci, :] = (alpha - 1.0) * fs[rng.choice(len(fs), size=(reps, M), p=pr / pr.sum())]
        lz = np.where(rolled, lme(g, 2), 0.0)                           # [reps, K]
        pk = softmax(a + lz)
        if M > 1 and rolled.any():
            # leave-one-out logmeanexp over r != j: by subtraction from the max-shifted sum (safe:
            # the max stays in it), except for the max itself, whose sum is taken over the others
            m1 = g.max(2, keepdims=True)
            tot = np.exp(g - m1).sum(2, keepdims=True)
            loo = m1 + np.log(np.maximum(tot - np.exp(g - m1), 1e-300) / (M - 1))      # [reps, K, M]
            top = g.argmax(2)
            rest = np.where(np.arange(M) == top[..., None], -np.inf, g)
            loo_top = lme(rest, 2) + math.log(M / (M - 1))
            np.put_along_axis(loo, top[..., None], loo_top[..., None], 2)
            loo = loo.transpose(0, 2, 1)                                                # [reps, M, K]
            ps = softmax(a + np.where(rolled, loo, 0.0))
            jk = np.clip(M * pk - (M - 1) / M * ps.sum(1), 0.0, None)
            pk = jk / jk.sum(-1, keepdims=True)
        token_law[prefix] = dict(zip(cands, pk.mean(0)))
    law: Law = {}
    for s in tree.states():
        pr = 1.0
        for i in range(len(s)):
            pr *= token_law[s[:i]].get(s[i], 0.0)
        if pr > 0.0:
            law[s] = pr
    return law


def _mh_matrix(states, pos, lp, lq, alpha, base) -> np.ndarray:
    """Transition matrix of one MH step: cut m uniform on {base, .., t-1}, resample the suffix."""
    n = len(states)
    P = np.zeros((n, n))
    for i, x in enumerate(states):
        t = len(x)
        if t <= base or not np.all(np.isfinite(lq[i])):
            P[i, i] = 1.0  # a state this stage never visits (finished earlier, or outside top-k)
            continue
        for m in range(base, t):
            w = 1.0 / (t - base)
            for j, y in enumerate(states):
                if len(y) <= m or y[:m] != x[:m]:
                    continue
                q = math.exp(lq[j][m:].sum())
                if q == 0.0:
                    continue
                log_a = (
                    alpha * (lp[j][m:].sum() - lp[i][m:].sum())
                    + (lq[i][m:].sum() - lq[j][m:].sum())
                    + math.log(t - base) - math.log(len(y) - base)
                )
                a = 1.0 if log_a >= 0 else math.exp(log_a)
                P[i, j] += w * q * a
                P[i, i] += w * q * (1.0 - a)
    return P


# ----------------------------------------------------------------------------------------------
# Distances and sampling-noise yardsticks
# ----------------------------------------------------------------------------------------------
def _to_law(d: dict) -> Law:
    total = float(sum(d.values()))
    return {k: v / total for k, v in d.items()}


def counts_of(samples: Iterable[Sequence[int]]) -> Dict[State, int]:
    out: Dict[State, int] = {}
    for s in samples:
        s = tuple(int(t) for t in s)
        out[s] = out.get(s, 0) + 1
    return out


def tv(law_a: dict, counts_or_law_b: dict) -> float:
    """Total variation distance; either argument may hold counts (normalised here)."""
    a, b = _to_law(law_a), _to_law(counts_or_law_b)
    return 0.5 * sum(abs(a.get(s, 0.0) - b.get(s, 0.0)) for s in set(a) | set(b))


def sample_law(law: Law, n_draws: int, rng: np.random.Generator) -> Dict[State, int]:
    """Counts of ``n_draws`` exact draws from ``law``."""
    keys = list(law)
    p = np.array([law[k] for k in keys])
    c = rng.multinomial(n_draws, p / p.sum())
    return {k: int(v) for k, v in zip(keys, c) if v > 0}


def tv_noise_reference(law: Law, n_draws: int, rng: np.random.Generator, reps: int = 51) -> float:
    """Median TV between ``law`` and the empirical law of ``n_draws`` exact draws from it."""
    return float(np.median([tv(law, sample_law(law, n_draws, rng)) for _ in range(reps)]))


def chi_square_pvalue(counts: Dict[State, int], law: Law, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit of ``counts`` to ``law``; cells with expected count below
    ``min_expected`` are pooled. An observed state outside the support of ``law`` gives 0.0."""
    from scipy.stats import chisquare

    n = sum(counts.values())
    if any(law.get(s, 0.0) <= 0.0 for s in counts):
        return 0.0
    cells = sorted(((n * p, counts.get(s, 0)) for s, p in law.items()), key=lambda c: c[0])
    exp_, obs_ = [], []
    pool_e, pool_o = 0.0, 0
    for e, o in cells:  # ascending expected: pool the small cells together
        if e >= min_expected and pool_e == 0.0:
            exp_.append(e)
            obs_.append(o)
            continue
        pool_e, pool_o = pool_e + e, pool_o + o
        if pool_e >= min_expected:
            exp_.append(pool_e)
            obs_.append(pool_o)
            pool_e, pool_o = 0.0, 0
    if pool_e > 0:  # leftover small pool: merge into the smallest kept cell
        if exp_:
            exp_[0] += pool_e
            obs_[0] += pool_o
        else:
            exp_, obs_ = [pool_e], [pool_o]
    if len(exp_) < 2:
        return 1.0
    exp_arr = np.array(exp_)
    exp_arr *= n / exp_arr.sum()  # guard against float drift in sum(law) != 1
    return float(chisquare(np.array(obs_, dtype=float), exp_arr).pvalue)


# The standard exactness setting of the sampler tests: prompt [0, 1], 4 new tokens in blocks of 2
# (121 final states), EOS 3, alpha 4; chi-square p-values below P_MIN fail.
PROMPT, T, B, EOS, ALPHA = [0, 1], 4, 2, 3, 4.0
P_MIN = 1e-3
