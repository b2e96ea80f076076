"""`sps_token`: Scalable Power Sampling, token level (Ji et al., arXiv 2601.21590, Algorithm 1).
(`sps`, the block-level Algorithm 2, is `sps_block.py`; it reuses `jackknife_probs` from here.)

p^alpha(x_t | prefix) ∝ p(x_t | prefix)^alpha * zeta(x_t), zeta(c) = E_{future ~ p}[p(future)^(alpha-1)]
over the futures after (prefix, c) that end with EOS or at the budget. Per token:
  1. the prefix row feeds the prefix's last token (one decode step; the token the runner samples
     there is scratch, written to buffer 1 and ignored): its logits give the top-K candidates by p;
  2. for each candidate c that is not EOS, M rollouts: rows forked from the prefix row, each feeds c
     and samples up to h = min(H, budget left after c) tokens from p (temperature 1, `Seq.tau`),
     stopping at EOS; f_{c,r} = sum of the rollout's log p;
  3. log zeta_c = logmeanexp_r((alpha - 1) f_{c,r}) (EOS candidates and h = 0: zeta = 1);
     p_c = softmax_c(alpha * log p(c) + log zeta_c) over the candidates; leave-one-out p^(-s) with
     rollout slot s removed for every candidate; jackknife p^JK = M p - (M-1)/M sum_s p^(-s),
     clipped at 0 and renormalised (M = 1: p itself); the token is drawn from p^JK with the
     group's own random stream. `logq` of the result holds log p^JK of each chosen token.
Rollouts are discarded after each decision; only the chosen token is appended.

Rows: 1 + K*M per sample. The prefix row is the one owner of the kept sequence (its K/V; the kept
tokens and log-probs are written to its buffer 0 at the end). A rollout row holds the prefix's K/V
up to the length it was last forked at (rollouts only write past it), so each decision forks only
the new positions (`KVManager.fork(start=...)`: one position per row per token, one launch for
all rows of a step). Keeping the prefix in a rollout row of the chosen candidate instead would
save the prefix step (1 of 1 + h steps per token) and one row; the separate row keeps the kept
sequence's K/V and buffers in one place.

Approximate by construction: top-K candidates (tokens outside are never drawn), finite M (ratio
bias, jackknife-reduced), finite H (futures truncated after H tokens are scored by their first H).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import torch

from ...sampling_params import SamplingParams
from ..sequence import Phase
from .base import Policy


@dataclass(eq=False)
class Lookahead:
    rng: random.Random
    role: Dict[object, tuple]          # rollout seq -> (candidate slot, rollout slot)
    valid: Dict[object, int]           # rollout seq -> prefix positions its row holds
    tokens: List[int] = field(default_factory=list)
    lp: List[float] = field(default_factory=list)
    lq: List[float] = field(default_factory=list)
    cands: List[int] = field(default_factory=list)
    cand_lp: np.ndarray = None
    rolled: np.ndarray = None          # [K] bool: candidate has rollouts
    f: np.ndarray = None               # [K, M] summed log p of each rollout
    pending: int = 0
    rollout_tokens: int = 0
    clipped: int = 0                   # decisions where the jackknife went negative somewhere
    cand_stop: List[bool] = field(default_factory=list)  # candidate completes a stop string (as EOS: zeta = 1)
    stopped: bool = False              # the kept sequence ended at a stop string
    dec_top: list = field(default_factory=list)  # params.logprobs: this decision's top-N [(id, log p)]
    top: list = field(default_factory=list)      # params.logprobs: (log p, top-N) of every kept token


def _logmeanexp(x: np.ndarray, axis=-1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return (m + np.log(np.mean(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def jackknife_probs(alpha: float, cand_lp: np.ndarray, f: np.ndarray, rolled: np.ndarray):
    """p^JK over the candidates from their base log-probs [K], rollout sums f [K, M] and which of them
    have rollouts [K] (the others: zeta = 1). Returns (p^JK, clipped?)."""
    K, M = f.shape
    a = alpha * cand_lp
    lz = np.where(rolled, _logmeanexp((alpha - 1.0) * f), 0.0)
    p = _softmax(a + lz)
    if M == 1 or not rolled.any():
        return p, False
    g = (alpha - 1.0) * f
    loo = np.stack([_logmeanexp(np.delete(g, s, axis=1)) for s in range(M)])  # [M, K]
    p_s = _softmax(a + np.where(rolled, loo, 0.0))                                # [M, K]
    jk = M * p - (M - 1) / M * p_s.sum(0)
    clipped = bool((jk < 0).any())
    jk = np.clip(jk, 0.0, None)
    return (jk / jk.sum(), clipped) if jk.sum() > 0 else (p, clipped)


class SPSPolicy(Policy):
    name = "sps_token"

    def rows(self, p: SamplingParams):
        return 1 + p.sps_top_k * p.sps_rollouts, 0

    def planned_tokens(self, p: SamplingParams) -> float:
        T = p.max_new_tokens
        return float(T * (1 + p.sps_top_k * p.sps_rollouts * min(p.sps_horizon, (T - 1) / 2)))

    def start(self, eng, g):
        M, P = g.params.sps_rollouts, len(g.prompt)
        head, rest = g.seqs[0], g.seqs[1:]
        g.state = Lookahead(random.Random(g.seed), {s: divmod(j, M) for j, s in enumerate(rest)},
                            {s: P - 1 for s in rest})
        for s in g.seqs:
            s.tau = 1.0  # rollouts sample from p; the prefix step's draw is scratch (same setting: one sampling group)
            s.topn = False  # the kept tokens' log-probs come from the decision's own log-softmax (on_ended)
        for s in rest:
            s.phase = Phase.HELD
        head.start([], 1, g.prompt[-1], buf=1)

    # ------------------------------------------------------------------ engine callbacks
    def on_step(self, eng, seqs):
        for s in seqs:
            if s is not s.group.seqs[0]:
                ci, r = s.group.state.role[s]
                s.group.state.f[ci, r] += s.last_lp
                s.group.state.rollout_tokens += 1

    def on_ended(self, eng, seqs):
        heads = [s for s in seqs if s is s.group.seqs[0]]
        for s in seqs:
            if s is not s.group.seqs[0]:
                st = s.group.state
                s.phase = Phase.HELD
                st.pending -= 1
                if st.pending == 0:
                    self._decide(eng, s.group)
        if heads:
            K = max(max(s.group.params.sps_top_k, s.group.params.logprobs or 0) for s in heads)
            rows = torch.tensor([s.row for s in heads], device=eng.device)
            logp = torch.log_softmax(eng.last_logits.index_select(0, rows).float(), -1)
            val, idx = logp.topk(min(K, logp.shape[-1]), dim=-1)
            val, idx = val.tolist(), idx.tolist()  # one sync for every decision of this step
            for s, v, i in zip(heads, val, idx):
                s.phase = Phase.HELD  # the prefix row waits for its rollouts
                k, n = s.group.params.sps_top_k, s.group.params.logprobs
                if n is not None:  # the same log-softmax gives the kept token's log p: bit-consistent
                    s.group.state.dec_top = list(zip(i[:n], v[:n]))
                self._branch(eng, s.group, i[:k], v[:k])

    # ------------------------------------------------------------------ one decision
    def _branch(self, eng, g, cands: List[int], cand_lp: List[float]):
        """Start the rollouts of every candidate (forked from the prefix row), or decide at once."""
        st, p, head = g.state, g.params, g.seqs[0]
        K, M = len(cands), p.sps_rollouts
        h = min(p.sps_horizon, p.max_new_tokens - len(st.tokens) - 1)
        st.cands, st.cand_lp = cands, np.array(cand_lp, dtype=np.float64)
        st.cand_stop = [bool(p.stop) and eng.stop_completes(p.stop, st.tokens, c) for c in cands]
        st.rolled = np.array([h > 0 and c not in eng.eos and not cs for c, cs in zip(cands, st.cand_stop)])
        st.f = np.zeros((K, M))
        L = eng.kv.lengths[head.row]
        by_start: Dict[int, list] = {}
        for ci in np.flatnonzero(st.rolled):
            for r in range(M):
                s = g.seqs[1 + ci * M + r]
                by_start.setdefault(st.valid[s], []).append(s)
                st.valid[s] = L
                s.stop_context = st.tokens  # a stop string may span the kept tokens and the rollout's
                s.start([cands[ci]], 1 + h, cands[ci], buf=0)
                st.pending += 1
        for start, ss in by_start.items():
            eng.kv.fork(head.row, [s.row for s in ss], L, owner=g, start=start)
        if st.pending == 0:
            self._decide(eng, g)

    def _decide(self, eng, g):
        t0 = time.perf_counter()
        st, p, head = g.state, g.params, g.seqs[0]
        probs, clipped = jackknife_probs(p.alpha, st.cand_lp, st.f, st.rolled)
        st.clipped += clipped
        u = st.rng.random()
        j = int(min(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"), len(probs) - 1))
        tok = st.cands[j]
        st.tokens.append(tok)
        st.lp.append(float(st.cand_lp[j]))
        st.lq.append(math.log(probs[j]))
        if p.logprobs is not None:
            st.top.append((float(st.cand_lp[j]), st.dec_top))
        st.stopped = st.cand_stop[j]
        eng.charge("accept_s", t0, [g])
        if tok in eng.eos or len(st.tokens) >= p.max_new_tokens or st.stopped:
            return self._finish(eng, g)
        head.start([], 1, tok, buf=1)

    def _finish(self, eng, g):
        st, row, t = g.state, g.seqs[0].row, len(g.state.tokens)
        kv = eng.kv
        kv.tok[0, row, :t] = torch.tensor(st.tokens, dtype=kv.tok.dtype)
        kv.lp[0, row, :t] = torch.tensor(st.lp, dtype=kv.lp.dtype)
        kv.lq[0, row, :t] = torch.tensor(st.lq, dtype=kv.lq.dtype)
        extra = {"decisions": t, "rollout_tokens": st.rollout_tokens, "jackknife_clipped": st.clipped}
        eng.finish(g, list(st.tokens), row, buf=0, extra=extra, stopped=st.stopped,
                   logprobs=st.top if g.params.logprobs is not None else None)
