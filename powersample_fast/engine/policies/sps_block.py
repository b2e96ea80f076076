"""`sps`: Scalable Power Sampling, block level (Ji et al., arXiv 2601.21590, Appendix B, Algorithm 2).

p^alpha(b | x) ∝ p(b | x)^alpha * zeta(x + b), zeta(y) = E_{future ~ p}[p(future)^(alpha-1)] over the
futures after y that end with EOS or at the budget T. Per block, from the kept prefix x (t tokens):
  1. L candidate blocks of up to n = min(B, T - t) tokens from p (temperature 1), each stopping at
     EOS: L rows that hold x's K/V decode together, n sequential steps;
  2. G = the K most likely *distinct* candidates by the block's summed log p (ties: by token ids);
  3. every b in G that neither ends with EOS nor reaches T gets M rollouts of h = min(H, T - t - |b|)
     tokens from p (stopping at EOS), h sequential steps; f_{b,r} = the rollout's summed log p;
  4. log zeta_b = logmeanexp_r((alpha - 1) f_{b,r}) (no rollouts: zeta = 1), p_b ∝ p(b)^alpha zeta_b
     over G, leave-one-out p^(-s) and jackknife p^JK = M p - (M-1)/M sum_s p^(-s), clipped at 0 and
     renormalised (`sps.jackknife_probs`, shared with the token level);
  5. one block is drawn from p^JK with the sample's own random stream and appended to x.
The final block (n = T - t, shorter than B when B does not divide T) is the same step: its
candidates reach T, so none has a future and it draws from p^alpha over G (low-temperature
sampling of whole blocks over the candidates, the paper's rule for its last block).

Rows: max(L, K*M) per sample (L when no block can have rollouts: H = 0 or T <= B). There is no
separate prefix row: the chosen candidate's row keeps the kept prefix's K/V (all but its last
token, fed lazily as everywhere in the engine), and the next block's candidates are forked from it.
Each phase runs in the group's lowest rows (L for candidates, |rolled| * M for rollouts), so the
engine's step (which computes rows up to the highest decoding one) skips the others when the
group is the batch's top one. A candidate whose row is among the rollout rows runs its rollout 0
there (it writes only past the block); one above them keeps its row held; the other rollouts run
in rows forked from the candidate's.
Every row's K/V contents are tracked as the token list they encode (`held`), and a fork copies
only the positions after the longest common prefix of that list and the source's (a candidate row
already holds the prefix up to the previous block, a rollout row of the chosen block all of it).

Stop strings (params.stop) act as EOS (ALGORITHM.md "Stop strings"): a candidate or rollout ends
at one (the engine checks it, the kept tokens included), such a candidate gets no rollouts and
ends the sample if drawn. Log-probs (params.logprobs): each candidate token's top-N entry is kept
from its step (`eng.step_logprobs`), and the drawn block's go to the result.
Approximate by construction: only the K best distinct of L sampled blocks can be drawn; finite M
(ratio bias, jackknife-reduced); finite H (futures scored by their first H tokens). With K >= the
number of distinct blocks, L large, H to the end and M large it approaches p^alpha.
Cost per block: n + h sequential decode steps (~2x plain decoding when H = B), over L then
|G| * M rows.
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
from ..kv_manager import common_prefix
from ..sequence import Phase
from .base import Policy
from .sps_token import jackknife_probs


@dataclass(eq=False)
class Candidate:
    tokens: tuple
    lp: float                          # summed log p of the block
    token_lp: List[float]              # per-token log p
    seq: object                        # the row that holds its K/V (all but its last token)
    rolled: bool = False
    stopped: bool = False              # ends at a stop string (as EOS: no rollouts, ends the sample if drawn)
    top: list = field(default_factory=list)  # params.logprobs: per token (log p, top-N), from its steps


@dataclass(eq=False)
class BlockState:
    rng: random.Random
    held: Dict[object, list]           # seq -> tokens whose K/V its row holds from position P-1 (prompt[-1] first)
    holder: object                     # seq whose row holds the kept prefix (all but its last token)
    x: List[int] = field(default_factory=list)       # kept tokens
    lp: List[float] = field(default_factory=list)    # their log p
    lq: List[float] = field(default_factory=list)    # log p^JK of each block on its last token, 0 elsewhere
    rolling: bool = False              # phase: candidates (False) or rollouts (True)
    active: List[object] = field(default_factory=list)  # seqs decoding in this phase (candidate order)
    pending: int = 0
    cand_lp: Dict[object, List[float]] = field(default_factory=dict)  # candidate seq -> per-token log p
    cand_top: Dict[object, list] = field(default_factory=dict)        # params.logprobs: candidate seq -> entries
    top: list = field(default_factory=list)  # params.logprobs: the kept tokens' entries
    stopped: bool = False              # the kept tokens end at a stop string
    G: List[Candidate] = field(default_factory=list)
    role: Dict[object, tuple] = field(default_factory=dict)            # rollout seq -> (candidate slot, rollout slot)
    f: np.ndarray = None               # [|G|, M] summed log p of each rollout
    blocks: int = 0
    distinct: List[int] = field(default_factory=list)   # distinct candidates per block
    candidate_tokens: int = 0
    rollout_tokens: int = 0
    clipped: int = 0                   # blocks where the jackknife went negative somewhere


def has_rollouts(p: SamplingParams) -> bool:
    """Whether any block of a run with these params can get rollouts (else rows = L)."""
    return p.sps_horizon > 0 and p.max_new_tokens > p.block_size


class BlockSPSPolicy(Policy):
    name = "sps"

    def rows(self, p: SamplingParams):
        L = p.sps_candidates
        return (max(L, p.sps_top_k * p.sps_rollouts) if has_rollouts(p) else L), 0

    def planned_tokens(self, p: SamplingParams) -> float:
        """Tokens sampled if no row stops at EOS: L*n per block, K*M*h per block with a future."""
        T, B = p.max_new_tokens, p.block_size
        tot = 0.0
        for t in range(0, T, B):
            n = min(B, T - t)
            tot += p.sps_candidates * n + p.sps_top_k * p.sps_rollouts * min(p.sps_horizon, T - t - n)
        return tot

    def start(self, eng, g):
        for s in g.seqs:
            s.tau = 1.0  # candidates and rollouts sample from p
            s.phase = Phase.HELD
        g.state = BlockState(random.Random(g.seed), {s: [] for s in g.seqs}, g.seqs[0])
        self._candidates(eng, g)

    # ------------------------------------------------------------------ engine callbacks
    def on_step(self, eng, seqs):
        for s in seqs:
            st = s.group.state
            if st.rolling:
                ci, r = st.role[s]
                st.f[ci, r] += s.last_lp
                st.rollout_tokens += 1
            else:
                st.cand_lp[s].append(s.last_lp)
                st.candidate_tokens += 1
                if s.group.params.logprobs is not None:
                    st.cand_top[s].append(eng.step_logprobs(s))

    def on_ended(self, eng, seqs):
        for s in seqs:
            st = s.group.state
            s.phase = Phase.HELD
            st.held[s] = st.held[s] + s.tokens[:-1]  # fed: the start token (already in held) + all but the last
            st.pending -= 1
            if st.pending == 0:
                (self._decide if st.rolling else self._select)(eng, s.group)

    # ------------------------------------------------------------------ phases
    def _fork(self, eng, g, src, dsts, n: int):
        """Rows of `dsts` get src's K/V positions [0, P-1+n): only the positions after each one's
        common prefix with src are copied (one queued fork per distinct start)."""
        st, base = g.state, len(g.prompt) - 1
        want = st.held[src][:n]
        by_start: Dict[int, list] = {}
        for d in dsts:
            by_start.setdefault(common_prefix(st.held[d], want), []).append(d)
            st.held[d] = list(want)
        for c, ds in by_start.items():
            eng.kv.fork(src.row, [d.row for d in ds], base + n, owner=g, start=base + c)

    def _candidates(self, eng, g):
        """Phase 1: L candidate blocks from the kept prefix, in the group's lowest rows."""
        st, p = g.state, g.params
        t = len(st.x)
        n = min(p.block_size, p.max_new_tokens - t)
        rows = sorted(g.seqs, key=lambda s: s.row)[:p.sps_candidates]
        self._fork(eng, g, st.holder, [s for s in rows if s is not st.holder], t)
        feed = st.x[-1] if st.x else g.prompt[-1]
        st.rolling, st.active, st.pending, st.cand_lp, st.cand_top = False, rows, len(rows), {}, {}
        for s in rows:
            st.held[s] = st.held[s] + [feed]
            st.cand_lp[s], st.cand_top[s] = [], []
            s.start([], n, feed, buf=0)
            s.stop_context, s.topn = list(st.x) if p.stop else [], True  # a stop may span kept tokens + block

    def _select(self, eng, g):
        """Phase 2: the K best distinct candidates; rollouts for those with a future."""
        st, p = g.state, g.params
        t, T, M = len(st.x), p.max_new_tokens, p.sps_rollouts
        best: Dict[tuple, Candidate] = {}
        active = set(st.active)
        for s in (s for s in g.seqs if s in active):  # duplicates: the first seq's log p (stable across runs)
            key = tuple(s.tokens)
            if key not in best:
                lps = st.cand_lp[s]
                best[key] = Candidate(key, float(math.fsum(lps)), lps, s, stopped=s.stopped, top=st.cand_top[s])
        st.distinct.append(len(best))
        st.G = sorted(best.values(), key=lambda c: (-c.lp, c.tokens))[:p.sps_top_k]
        h = {}
        for c in st.G:
            h[c] = min(p.sps_horizon, T - t - len(c.tokens))
            c.rolled = h[c] > 0 and c.tokens[-1] not in eng.eos and not c.stopped
        rolled = [c for c in st.G if c.rolled]
        st.f = np.zeros((len(st.G), M))
        if not rolled:
            return self._decide(eng, g)
        # every rollout runs in the group's lowest len(rolled) * M rows: a candidate among them hosts its
        # own rollout 0 (it writes only past the block), one above them keeps its row held; the other rows
        # there are free (a G candidate without rollouts ends the sample if drawn: its row is not needed)
        low = sorted(g.seqs, key=lambda s: s.row)[:len(rolled) * M]
        hosts = {c.seq for c in rolled} & set(low)
        pool = [s for s in low if s not in hosts]
        st.rolling, st.active, st.role = True, [], {}
        for ci, c in enumerate(st.G):
            if not c.rolled:
                continue
            own = [c.seq] if c.seq in hosts else []
            others = [pool.pop(0) for _ in range(M - len(own))]
            self._fork(eng, g, c.seq, others, t + len(c.tokens))
            for r, s in enumerate(own + others):
                st.role[s] = (ci, r)
                st.held[s] = st.held[s] + [c.tokens[-1]]
                s.start([], h[c], c.tokens[-1], buf=0)
                s.stop_context, s.topn = (st.x + list(c.tokens)) if p.stop else [], False
                st.active.append(s)
        st.pending = len(st.active)

    def _decide(self, eng, g):
        """Phase 3: draw one block from p^JK over G; its row keeps the new prefix."""
        t0 = time.perf_counter()
        st, p = g.state, g.params
        cand_lp = np.array([c.lp for c in st.G])
        rolled = np.array([c.rolled for c in st.G])
        probs, clipped = jackknife_probs(p.alpha, cand_lp, st.f, rolled)
        st.clipped += clipped
        u = st.rng.random()
        j = int(min(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"), len(probs) - 1))
        c = st.G[j]
        st.x += c.tokens
        st.lp += c.token_lp
        st.lq += [0.0] * (len(c.tokens) - 1) + [math.log(probs[j])]
        st.top, st.stopped = st.top + c.top, c.stopped
        st.blocks += 1
        st.holder = c.seq
        st.rolling, st.active, st.G, st.role = False, [], [], {}
        eng.charge("accept_s", t0, [g])
        if c.tokens[-1] in eng.eos or len(st.x) >= p.max_new_tokens or c.stopped:
            return self._finish(eng, g)
        st.held[c.seq] = st.held[c.seq][:len(st.x)]  # drop what its rollout 0 appended
        eng.kv.truncate(c.seq.row, len(g.prompt) - 1 + len(st.x))
        self._candidates(eng, g)

    def _finish(self, eng, g):
        st, row, t = g.state, g.state.holder.row, len(g.state.x)
        kv = eng.kv
        kv.tok[0, row, :t] = torch.tensor(st.x, dtype=kv.tok.dtype)
        kv.lp[0, row, :t] = torch.tensor(st.lp, dtype=kv.lp.dtype)
        kv.lq[0, row, :t] = torch.tensor(st.lq, dtype=kv.lq.dtype)
        extra = {"blocks": st.blocks, "distinct_candidates": list(st.distinct),
                 "candidate_tokens": st.candidate_tokens, "rollout_tokens": st.rollout_tokens,
                 "jackknife_clipped": st.clipped}
        eng.finish(g, list(st.x), row, buf=0, extra=extra, stopped=st.stopped,
                   logprobs=st.top if g.params.logprobs is not None else None)
