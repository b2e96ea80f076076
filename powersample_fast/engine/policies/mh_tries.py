"""Multiple-try Metropolis for the `mh` policy (mh_tries=k > 1; issue 22, ALGORITHM.md "Faster
mixing"): the engine plumbing around the host rule of mh_mixing.py.

A chain's group has 2k - 1 decode rows: the work row (seq 0) decodes try 1, seqs 1..k-1 the other
tries, seqs k..2k-2 the k - 1 reference draws, all in the same phase from the same cut m, so a
proposal step costs the sequential decode steps of one proposal. Each proposal forks x_<m's K/V
from the work row into the helper rows, copying only the positions that changed since the last fork
(`Chain.synced`). A row whose segment ended is held until all 2k - 1 ended; the decision is then
taken on the host from the per-token lp / lq / h kept there (`Chain.seg`): select try J with
probability w(y_J) / sum_j w(y_j), accept with the multiple-try ratio that includes the reference
set. An accepted try J != 1 has its suffix K/V and token buffers copied into the work row; a reject
restores the backed-up suffix of the current state, as Algorithm 1 does.
"""
from __future__ import annotations

import math
import time

from ..sequence import Phase
from . import mh_mixing as mix


def start_helpers(eng, g, m: int, feed: int):
    """The other tries and the reference draws continue x_<m like the work row (which now feeds
    `feed` at position P + m - 1)."""
    c, p = g.state, g.params
    L = len(g.prompt) + m - 1
    helpers = g.seqs[1:]
    eng.kv.fork(g.seqs[0].row, [s.row for s in helpers], L, owner=g, start=min(c.synced, L))
    c.synced = L  # no row writes below L before the next fork (decode starts at L)
    for s in helpers:
        s.start(c.state[:m], p.stage_limit(c.k), feed, buf=1)
    c.pending = len(g.seqs)


def row_ended(s) -> bool:
    """A proposal row of a multiple-try step ended: it is held; True once all 2k - 1 have ended."""
    c = s.group.state
    s.phase = Phase.HELD
    c.pending -= 1
    return c.pending == 0


def decide(eng, g, lo: int):
    """The multiple-try decision of a finished proposal step (the caller then moves the chain on)."""
    t0 = time.perf_counter()
    c, p, kv = g.state, g.params, eng.kv
    m, t, P, k = c.cut, len(c.state), len(g.prompt), c.tries
    work = g.seqs[0].row
    log_w_x = mix.log_weight(p.alpha, math.fsum(c.lps[m:]), math.fsum(c.lqs[m:]), c.W_state(lo))
    log_w = [mix.log_weight(p.alpha, math.fsum(lp), math.fsum(lq), c.W(lo, m, hs)) for lp, lq, hs in c.seg]
    J = mix.select_try(log_w[:k], c.rng.random())
    log_a = mix.mtm_log_accept(log_w[:k], log_w[k:], log_w_x)
    if math.log(1.0 - c.rng.random()) < log_a:
        c.accepted += 1
        y = g.seqs[J]
        t2, src = len(y.tokens), y.row
        kv.take_proposal(src, work, m, t2)  # token (and log-prob) buffers: try J's suffix -> the state's
        if src != work:  # its K/V [P+m, P+t2-1) into the work row (position P+m-1 is shared)
            kv.restore(src, work, P + m, t2 - 1 - m, P + t2 - 1, owner=g)
        c.state, c.stopped = list(y.tokens), y.stopped
        c.take_segment(J, m)
    else:  # restore the backed-up suffix [P+m, P+t-1) of the current state
        kv.restore(g.store_rows[0], work, P + m, t - 1 - m, P + t - 1, owner=g)
    c.steps_done += 1
    eng.charge("accept_s", t0, [g])
