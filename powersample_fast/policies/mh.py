"""`mh`: Algorithm 1 of Karan & Du (ALGORITHM.md), exact Metropolis-Hastings over p^alpha.

One decode row per chain (its *work* row) and one store row (the *backup*). KV invariant: the work
row holds the current state's K/V for every position but the last token's (fed lazily). A proposal
at cut m backs up positions [P+m, P+t-1) into the store row, truncates the work row to P+m-1 and
re-feeds x_{m-1}, so every sampled token costs one model position and no prefix is recomputed.
Accept keeps the work row; reject copies the backed-up range back. A proposal ends where its row's
segment ends (EOS or the stage limit L_k): `on_ended` is where every MH decision of a step is taken,
in one `mh_accept_` launch per alpha.

EOS across stages (ALGORITHM.md step 3): a state that ends with EOS before the last stage jumps to
the final stage's N MH steps (L_K = T), unless params.early_stop or index="last_block".
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import List

import torch
from torch.profiler import record_function

from .. import ops
from ..params import SamplingParams


@dataclass(eq=False)
class Chain:
    rng: random.Random
    k: int = 1                     # stage
    state: List[int] = field(default_factory=list)  # current x (host mirror)
    proposing: bool = False
    cut: int = 0
    steps_done: int = 0
    accepted: int = 0
    proposed: int = 0
    jumped: bool = False           # jumped to the final stage after an early EOS


class MHPolicy:
    name = "mh"

    def rows(self, params: SamplingParams):
        return 1, 1

    def planned_tokens(self, p: SamplingParams) -> float:
        """Extension + N proposals per stage of mean suffix (L_k - lo + 1) / 2 (uniform cuts)."""
        tot = float(p.max_new_tokens)
        for k in range(1, p.num_blocks + 1):
            lo = 0 if p.index == "uniform" else (k - 1) * p.block_size
            tot += p.mcmc_steps * (p.stage_limit(k) - lo + 1) / 2
        return tot

    def start(self, eng, group):
        group.state = Chain(random.Random(group.seed))
        self._extend(group)

    # ------------------------------------------------------------------ segments
    def _extend(self, g):
        c, p = g.state, g.params
        c.proposing, c.steps_done = False, 0
        feed = c.state[-1] if c.state else g.prompt[-1]  # the state's last token, never fed yet
        g.seqs[0].start(list(c.state), p.stage_limit(c.k), feed, buf=0)

    def _propose(self, eng, g):
        c, p, seq = g.state, g.params, g.seqs[0]
        t, P = len(c.state), len(g.prompt)
        lo = 0 if p.index == "uniform" else (c.k - 1) * p.block_size
        m = lo + c.rng.randrange(t - lo)
        c.proposing, c.cut = True, m
        c.proposed += 1
        eng.kv.copy_range(seq.row, g.store_rows[0], P + m, t - 1 - m, owner=g)  # back up [P+m, P+t-1)
        eng.kv.truncate(seq.row, P + m - 1)
        feed = c.state[m - 1] if m > 0 else g.prompt[-1]  # re-fed at position P + m - 1
        seq.start(c.state[:m], p.stage_limit(c.k), feed, buf=1)

    def _after_state(self, eng, g):
        """The state just changed (extension ended, or an MH step was decided)."""
        c, p = g.state, g.params
        if c.steps_done < p.mcmc_steps:
            return self._propose(eng, g)
        ends_eos = bool(c.state) and c.state[-1] in eng.eos
        if c.k >= p.num_blocks or (ends_eos and (p.early_stop or p.index == "last_block" or p.mcmc_steps == 0)):
            return self._finish(eng, g)
        if ends_eos:  # ALGORITHM.md step 3: run the final stage's N steps from this state
            c.k, c.jumped, c.steps_done = p.num_blocks, True, 0
            return self._propose(eng, g)
        c.k += 1
        self._extend(g)

    def _finish(self, eng, g):
        c = g.state
        extra = {"stage": c.k, "jumped_to_final_stage": c.jumped}
        eng.finish_group(g, eng.make_result(g, c.state, g.seqs[0].row, buf=0, accepted=c.accepted,
                                            proposed=c.proposed, extra=extra))

    # ------------------------------------------------------------------ decisions
    def on_ended(self, eng, seqs):
        decide = []
        for s in seqs:
            if s.group.state.proposing:
                decide.append(s)
            else:  # extension ended: it is the stage's state
                s.group.state.state = s.tokens
                self._after_state(eng, s.group)
        for alpha in sorted({s.group.params.alpha for s in decide}):
            self._accept(eng, [s for s in decide if s.group.params.alpha == alpha], alpha)

    def _accept(self, eng, seqs, alpha: float):
        t0 = time.perf_counter()
        kv, dev = eng.kv, eng.device
        groups = [s.group for s in seqs]
        cur_h, prop_h = [0] * kv.n_decode, [0] * kv.n_decode
        for s in seqs:
            cur_h[s.row], prop_h[s.row] = len(s.group.state.state), len(s.tokens)
        base = [0 if g.params.index == "uniform" else (g.state.k - 1) * g.params.block_size for g in groups]
        log_u = [math.log(1.0 - g.state.rng.random()) for g in groups]  # u in (0, 1]
        t = lambda xs, dt=torch.int64: torch.tensor(xs, dtype=dt, device=dev)  # noqa: E731
        with record_function("accept"):
            acc, _ = ops.mh_accept_(kv.tok[0], kv.lp[0], kv.lq[0], t(cur_h), kv.tok[1], kv.lp[1], kv.lq[1],
                                    t(prop_h), t([s.row for s in seqs]), t([g.state.cut for g in groups]),
                                    t(base), t(log_u, torch.float32), alpha)
            acc = acc.tolist()
        for s, g, a in zip(seqs, groups, acc):
            c, P = g.state, len(g.prompt)
            if a:
                c.accepted += 1
                c.state = s.tokens
            else:  # restore the backed-up suffix [P+cut, P+t-1) of the current state
                kv.restore(g.store_rows[0], s.row, P + c.cut, len(c.state) - 1 - c.cut, P + len(c.state) - 1, owner=g)
            c.steps_done += 1
        eng.charge("accept_s", t0, groups)
        for g in groups:
            self._after_state(eng, g)
