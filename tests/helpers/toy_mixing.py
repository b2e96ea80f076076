"""Exact laws of the MH mixing options (issue 22: index="entropy", mh_tries=k) on the enumerable toys
of helpers/laws.py, computed from transition matrices independently of the sampler, plus the expected decode
cost of a step (for benchmarks/bench_mh_mixing.py).

One MH step from state x (ALGORITHM.md "Faster mixing"): cut m ~ c_x(m) (uniform: 1 / (t - lo);
entropy: g(h_m) / W(x)); then, with F the states continuing x_<m (the fiber; q(y) = prod_{i>=m} q_i),
k tries and the k - 1 references are iid from q on F, and with w(z) = p(z)^alpha / q(z) / W(z)
(up to a factor common to F):

    P(x -> y | m) = k q(y) w(y) E[ min(1 / (w(y) + A), 1 / (w(x) + B)) ]      (y in F)

where A and B are independent, each the sum of k - 1 iid weights w(Z), Z ~ q (the other tries; the
references). (Select y in one of k slots with probability w(y) / (w(y) + A), accept with
min(1, (w(y) + A) / (w(x) + B)).) k = 1 gives Algorithm 1's kernel. E[1 / max(U, V)] is computed
exactly from the discrete laws of A and B. The remainder of each row goes to x (rejections).

Deliberately wrong variants (the tests must reject them): ``index_term=False`` drops 1 / W from the
weights (for k = 1: the log W(x) - log W(x') term omitted); ``references=False`` sets B = 0 (the
multiple-try rule without its reference set: accept with min(1, sum of the tries' weights / w(x))).
``references="tries"``: the unselected tries serve as the reference set (independent MTM, exact,
k rows; not implemented in the sampler): B = A, the kernel is k q(y) w(y) E[1 / (max(w(x), w(y)) + A)].
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from .laws import Law, State, _eos_set, _mask_top_k, mh_chain_law

TIE = 1e-9  # relative: sums of weights closer than this count as ties (1 / max is then the same)


def entropies(tree, state: State) -> np.ndarray:
    """h_i = entropy of p(. | x_<i) (temperature 1, fp64) for every position of ``state``."""
    out = np.empty(len(state))
    for i in range(len(state)):
        lp = torch.log_softmax(tree.logits[state[:i]], -1)
        out[i] = float(-(lp.exp() * lp).nan_to_num(0.0).sum())
    return out


def cut_weights(tree, state: State, index: str, eps: float, beta: float) -> np.ndarray:
    """w_i per position: 1 (uniform, last_block) or g(h_i) = eps + h_i ** beta (entropy)."""
    if index != "entropy":
        return np.ones(len(state))
    return eps + np.maximum(entropies(tree, state), 0.0) ** beta


def _sum_law(vals: np.ndarray, probs: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """Atoms (sorted) and probabilities of the sum of n iid draws of (vals, probs); atoms closer
    than 1e-12 (relative) are merged."""
    av, ap = np.zeros(1), np.ones(1)
    for _ in range(n):
        s = (av[:, None] + vals[None, :]).ravel()
        p = (ap[:, None] * probs[None, :]).ravel()
        o = np.argsort(s, kind="stable")
        s, p = s[o], p[o]
        keep = np.concatenate([[True], np.diff(s) > 1e-12 * np.abs(s[1:])])
        grp = np.cumsum(keep) - 1
        av = s[keep]
        ap = np.bincount(grp, weights=p)
    return av, ap


def _expected_inv_max(a: np.ndarray, b: float, A, B) -> np.ndarray:
    """E[1 / max(a + A, b + B)] for each entry of a (A, B independent discrete laws (atoms, probs))."""
    va, pa = A
    vb, pb = B
    cb = np.concatenate([[0.0], np.cumsum(pb)])
    ca = np.concatenate([[0.0], np.cumsum(pa)])
    u = a[:, None] + va[None, :]                                     # U atoms [ny, NA]
    # pairs with V <= U (1 + TIE) (ties included) give 1/U, the others (U (1 + TIE) < V) give 1/V
    p_v_le_u = cb[np.searchsorted(vb, u * (1 + TIE) - b, side="right")]
    t1 = (pa[None, :] / u * p_v_le_u).sum(1)
    v = b + vb                                                       # V atoms [NB]
    p_u_lt_v = ca[np.searchsorted(va, v[None, :] / (1 + TIE) - a[:, None], side="left")]
    t2 = (pb[None, :] / v[None, :] * p_u_lt_v).sum(1)
    return t1 + t2


def mixing_matrix(tree, states, pos, lp, lq, alpha, base, *, index="uniform", tries=1, eps=0.1, beta=1.0,
                  index_term=True, references=True) -> np.ndarray:
    """One-step transition matrix of the MH variant (cut `index`, `tries` k) over a stage's states.
    references: True (k - 1 fresh reference draws), False (none: wrong), "tries" (the unselected tries)."""
    n = len(states)
    P = np.zeros((n, n))
    logW = {}
    cw = {}
    for i, x in enumerate(states):
        w = cut_weights(tree, x, index, eps, beta)[base:]
        cw[i] = w
        logW[i] = math.log(w.sum()) if len(w) else 0.0
    fibers: Dict[tuple, tuple] = {}

    def fiber(m: int, prefix: State):
        key = (m, prefix)
        if key not in fibers:
            idx = [j for j, y in enumerate(states) if len(y) > m and y[:m] == prefix and np.all(np.isfinite(lq[j][m:]))]
            idx = np.array(idx, dtype=np.int64)
            q = np.array([math.exp(lq[j][m:].sum()) for j in idx])
            lw = np.array([alpha * lp[j][m:].sum() - lq[j][m:].sum() - (logW[j] if index_term else 0.0) for j in idx])
            w = np.exp(lw - lw.max())
            A = _sum_law(w[q > 0], q[q > 0], tries - 1)
            B = A if references is True else (np.zeros(1), np.ones(1))
            fibers[key] = (idx, q, w, A, B, {int(j): r for r, j in enumerate(idx)})
        return fibers[key]

    for i, x in enumerate(states):
        t = len(x)
        if t <= base or not np.all(np.isfinite(lq[i])):
            P[i, i] = 1.0  # a state this stage never visits (finished earlier, or outside top-k)
            continue
        c = cw[i] / cw[i].sum()
        for m in range(base, t):
            idx, q, w, A, B, where = fiber(m, x[:m])
            ok = (q > 0) & (w > 0)
            K = np.zeros(len(idx))
            if references == "tries":
                va, pa = A
                e = (pa[None, :] / (np.maximum(w[ok], w[where[i]])[:, None] + va[None, :])).sum(1)
            else:
                e = _expected_inv_max(w[ok], w[where[i]], A, B)
            K[ok] = tries * q[ok] * w[ok] * e
            cm = c[m - base]
            P[i, idx] += cm * K
            P[i, i] += cm * (1.0 - K.sum())
    return P


def mixing_chain_law(model, prompt, *, alpha: float, max_new_tokens: int, block_size: int, mcmc_steps: int, eos_id,
                     proposal_temperature: Optional[float] = None, top_k: Optional[int] = None, index: str = "uniform",
                     early_stop: bool = False, tries: int = 1, entropy_eps: float = 0.1, entropy_beta: float = 1.0,
                     index_term: bool = True, references: bool = True, stop=None) -> Law:
    """Exact law of the sampler's output with the mixing options (laws.mh_chain_law's stages, EOS jumps,
    early stop and stop strings, with ``mixing_matrix`` as the MH step)."""
    def matrix(tree, states, pos, lp, lq, a, base):
        return mixing_matrix(tree, states, pos, lp, lq, a, base, index=index, tries=tries, eps=entropy_eps,
                             beta=entropy_beta, index_term=index_term, references=references)

    return mh_chain_law(model, prompt, alpha=alpha, max_new_tokens=max_new_tokens, block_size=block_size,
                        mcmc_steps=mcmc_steps, eos_id=eos_id, proposal_temperature=proposal_temperature, top_k=top_k,
                        index=index, early_stop=early_stop, matrix=matrix, stop=stop)


class PrunedTree:
    """A ToyTree (same interface) that only expands tokens of probability >= min_prob: for toys with
    long deterministic stretches (a logit 40 below the others is never drawn by the Gumbel-max
    sampler, whose noise spans < 20, and carries < 1e-17 of p). next_logits_fn(list of full token
    lists) -> [N, V] raw logits."""

    def __init__(self, next_logits_fn, prompt, max_new_tokens: int, eos_id, min_prob: float = 1e-12):
        self.prompt = [int(t) for t in prompt]
        self.max_new_tokens = int(max_new_tokens)
        self.eos = _eos_set(eos_id)
        self.logits: Dict[State, torch.Tensor] = {}
        self.children: Dict[State, list] = {}
        level = [()]
        for _ in range(self.max_new_tokens):
            z = next_logits_fn([self.prompt + list(p) for p in level]).double()
            self.vocab_size = z.shape[-1]
            nxt = []
            for p, zp in zip(level, z):
                self.logits[p] = zp
                keep = [int(v) for v in torch.nonzero(torch.softmax(zp, -1) >= min_prob)[:, 0]]
                self.children[p] = keep
                nxt.extend(p + (v,) for v in keep if v not in self.eos)
            level = nxt

    def states(self, limit: Optional[int] = None):
        limit = self.max_new_tokens if limit is None else limit
        out = [p + (v,) for p in self.logits if len(p) < limit for v in self.children[p]
               if v in self.eos or len(p) + 1 == limit]
        return sorted(out, key=lambda s: (len(s), s))

    def token_logprobs(self, state: State, tau: float = 1.0, top_k: Optional[int] = None) -> np.ndarray:
        return np.array([torch.log_softmax(_mask_top_k(self.logits[state[:i]], top_k) / tau, -1)[t].item()
                         for i, t in enumerate(state)])


def stage_matrices(tree, *, alpha: float, proposal_temperature: float, index: str = "uniform", tries: int = 1,
                   entropy_eps: float = 0.1, entropy_beta: float = 1.0, references=True):
    """One stage over the whole budget of ``tree`` (a ToyTree or PrunedTree; block_size =
    max_new_tokens), for the mixing measurement:
    (states, v0 = the proposal law of the extension, P = one MH step, seq_cost, row_cost) where
    seq_cost[i] / row_cost[i] are the expected sequential decode steps / row-steps of one MH step from
    state i: a proposal step decodes 2k - 1 suffixes of iid lengths L_j (one step per sampled token),
    in parallel: sequential = E[max_j L_j], row-steps = (2k - 1) E[L]."""
    states = tree.states()
    pos = {s: i for i, s in enumerate(states)}
    lp = [tree.token_logprobs(s) for s in states]
    lq = [tree.token_logprobs(s, proposal_temperature) for s in states]
    v0 = np.array([math.exp(x.sum()) for x in lq])
    P = mixing_matrix(tree, states, pos, lp, lq, alpha, 0, index=index, tries=tries, eps=entropy_eps,
                      beta=entropy_beta, references=references)
    r = tries if references == "tries" else 2 * tries - 1
    seq_cost, row_cost = np.zeros(len(states)), np.zeros(len(states))
    for i, x in enumerate(states):
        w = cut_weights(tree, x, index, entropy_eps, entropy_beta)
        c = w / w.sum()
        for m in range(len(x)):
            lens: Dict[int, float] = {}
            for j, y in enumerate(states):
                if len(y) > m and y[:m] == x[:m]:
                    lens[len(y) - m] = lens.get(len(y) - m, 0.0) + math.exp(lq[j][m:].sum())
            L = np.array(sorted(lens))
            pL = np.array([lens[v] for v in L])
            cdf = np.cumsum(pL)
            cdf_prev = np.concatenate([[0.0], cdf[:-1]])
            e_max = float((L * (cdf ** r - cdf_prev ** r)).sum())
            seq_cost[i] += c[m] * e_max
            row_cost[i] += c[m] * r * float((L * pL).sum())
    return states, v0, P, seq_cost, row_cost
