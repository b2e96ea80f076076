"""`smc`: Power-SMC (Azizi et al., arXiv 2602.10273; ALGORITHM.md "Beyond Algorithm 1").

N particles per sample (one group, N decode rows, admitted together) decode in the shared batch from
the proposal softmax(top-k(z) / tau), tau default 1/alpha. At token t (1-based) every particle's
log-weight gains

    (a_t - a_{t-1}) * S_{t-1}  +  [still running] * (a_t * lp_t - lq_t)

with S the particle's cumulative log p and a_t the exponent schedule: a_t = alpha (no ramp: the
first term is zero), or with alpha_ramp_tokens = R > 0, a_t = 1 + (alpha - 1) * min(t, R) / R. The
intermediate target at step t is gamma_t(x) = p(x)^{a_t} over particles of length t or ended
earlier; if every particle ends before the ramp does, (alpha - a_t) * S is added at the end, so the
final target is p^alpha either way. A particle that ended (EOS or budget) keeps its row
(Phase.HELD: fed a dummy token inside the batch, its K/V intact) and its weight.

Every `resample_every` tokens: ESS = (sum w)^2 / sum w^2; below ess_threshold * N the particles are
resampled (systematic: one uniform from the group's own random stream). A parent keeps its row;
each extra copy goes into the row of a particle that left no offspring, so sources are never
destinations: K/V by `KVManager.fork` (queued: every resampling event of a step flushes as one
kv_copy_ launch before the next forward), token buffers by one indexed copy per buffer and event
(`KVManager.copy_buffers`), host state (tokens, phase, feed, S) by assignment. A child keeps its
own seed: it samples its own future.

Evidence: log Z_hat = sum over resampling epochs of (logsumexp of the epoch's log-weights - log N),
weights reset to 0 at each resampling. Z_hat is unbiased for Z = sum_x p(x)^alpha over the
sequences that end with EOS or at the budget (any N), and E[Z_hat * W_i 1(x_i = x)] = Z * pi(x):
the tests use both. The returned sample is one particle drawn in proportion to its final weight.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from ...sampling_params import SamplingParams
from ..sequence import Phase
from .base import Policy


@dataclass(eq=False)
class Swarm:
    rng: random.Random
    logw: np.ndarray                  # [N] log-weights since the last resampling
    S: np.ndarray                     # [N] cumulative log p of each particle
    index: Dict[object, int]          # seq -> particle index
    a: float = 1.0                    # exponent a_t of the current step
    t: int = 0
    log_z: float = 0.0
    resamples: int = 0
    ess: List[float] = field(default_factory=list)


def exponent(p: SamplingParams, t: int) -> float:
    """a_t: alpha, or the bridge 1 -> alpha over the first alpha_ramp_tokens tokens."""
    R = p.alpha_ramp_tokens
    return float(p.alpha) if R == 0 else 1.0 + (p.alpha - 1.0) * min(t, R) / R


def _logsumexp(x: np.ndarray) -> float:
    m = float(np.max(x))
    return m + math.log(float(np.sum(np.exp(x - m))))


def _weights(logw: np.ndarray) -> np.ndarray:
    w = np.exp(logw - np.max(logw))
    return w / w.sum()


def systematic(W: np.ndarray, u: float) -> np.ndarray:
    """Ancestor of each of N offspring: positions (u + i) / N against the cumulative weights."""
    N = len(W)
    cum = np.cumsum(W)
    return np.minimum(np.searchsorted(cum, (u + np.arange(N)) / N, side="right"), N - 1)


class SMCPolicy(Policy):
    name = "smc"

    def rows(self, params: SamplingParams):
        return params.particles, 0

    def planned_tokens(self, p: SamplingParams) -> float:
        return float(p.particles * p.max_new_tokens)

    def start(self, eng, g):
        N, p = len(g.seqs), g.params
        g.state = Swarm(random.Random(g.seed), np.zeros(N), np.zeros(N), {s: i for i, s in enumerate(g.seqs)},
                        a=exponent(p, 0))
        for s in g.seqs:
            s.start([], p.max_new_tokens, g.prompt[-1], buf=0)

    # ------------------------------------------------------------------ per token
    def on_step(self, eng, seqs):
        by: Dict[int, tuple] = {}
        for s in seqs:
            by.setdefault(id(s.group), (s.group, []))[1].append(s)
        held = Phase.HELD
        for g, stepped in by.values():
            st, p = g.state, g.params
            st.t += 1
            a = exponent(p, st.t)
            if a != st.a:  # bridge: every particle's target moves from p^{a_{t-1}} to p^{a_t}
                st.logw += (a - st.a) * st.S
            st.a = a
            for s in stepped:
                i = st.index[s]
                st.logw[i] += a * s.last_lp - s.last_lq
                st.S[i] += s.last_lp
                if s.tokens[-1] in eng.eos or len(s.tokens) >= s.limit or s.stopped:  # stop string: as EOS
                    s.phase = held
            running = any(s.phase is not held for s in g.seqs)
            if running and st.t % p.resample_every == 0:
                W = _weights(st.logw)
                ess = 1.0 / float(np.sum(W * W))
                st.ess.append(ess)
                if ess < p.ess_threshold * len(g.seqs):
                    self._resample(eng, g, W)
            if all(s.phase is held for s in g.seqs):  # (resampling may have replaced the last runners)
                self._finish(eng, g)

    def on_ended(self, eng, seqs):
        """Nothing left to do: on_step (called first, same step) holds ended particles and
        finishes a group once all of its particles ended."""

    # ------------------------------------------------------------------ resampling
    def _resample(self, eng, g, W: np.ndarray):
        t0 = time.perf_counter()
        st, N = g.state, len(g.seqs)
        st.log_z += _logsumexp(st.logw) - math.log(N)
        counts = np.bincount(systematic(W, st.rng.random()), minlength=N)
        free = [i for i in range(N) if counts[i] == 0]
        copies = []
        for i in np.flatnonzero(counts > 1):
            src = g.seqs[i]
            kids = [free.pop() for _ in range(counts[i] - 1)]
            eng.kv.fork(src.row, [g.seqs[j].row for j in kids], eng.kv.lengths[src.row], owner=g)
            for j in kids:
                d = g.seqs[j]
                d.tokens, d.feed, d.limit, d.buf, d.phase = list(src.tokens), src.feed, src.limit, src.buf, src.phase
                d.watch, d.stopped = None, src.stopped  # its stop watch is rebuilt from its tokens
                st.S[j] = st.S[i]
                copies.append((src.row, d.row))
        eng.kv.copy_buffers([c[0] for c in copies], [c[1] for c in copies])
        st.logw[:] = 0.0
        st.resamples += 1
        eng.charge("accept_s", t0, [g])

    # ------------------------------------------------------------------ result
    def _finish(self, eng, g):
        st, p, N = g.state, g.params, len(g.seqs)
        if st.a != p.alpha:  # the run ended inside the ramp: move every particle to p^alpha
            st.logw += (p.alpha - st.a) * st.S
        st.log_z += _logsumexp(st.logw) - math.log(N)
        W = _weights(st.logw)
        j = int(min(np.searchsorted(np.cumsum(W), st.rng.random(), side="right"), N - 1))
        extra = {"log_evidence": st.log_z, "resampling_events": st.resamples, "ess_trace": st.ess,
                 "final_ess": 1.0 / float(np.sum(W * W)), "particles_n": N, "particle_index": j}
        if p.return_all:
            rows = [s.row for s in g.seqs]
            T = max(len(s.tokens) for s in g.seqs)
            lp, lq = eng.kv.lp[0, rows, :T].tolist(), eng.kv.lq[0, rows, :T].tolist()
            extra["particles"] = [{"token_ids": list(s.tokens), "logp": lp[i][:len(s.tokens)],
                                   "logq": lq[i][:len(s.tokens)], "weight": float(W[i])}
                                  for i, s in enumerate(g.seqs)]
        s = g.seqs[j]
        eng.finish(g, s.tokens, s.row, buf=0, extra=extra, stopped=s.stopped)
