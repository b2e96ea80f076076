"""`mh`: Algorithm 1 of Karan & Du (ALGORITHM.md), exact Metropolis-Hastings over p^alpha.

One decode row per chain (its *work* row) and one store row (the *backup*). KV invariant: the work
row holds the current state's K/V for every position but the last token's (fed lazily). A proposal
at cut m backs up positions [P+m, P+t-1) into the store row, truncates the work row to P+m-1 and
re-feeds x_{m-1}, so every sampled token costs one model position and no prefix is recomputed.
Accept keeps the work row; reject copies the backed-up range back. A proposal ends where its row's
segment ends (EOS or the stage limit L_k): `on_ended` is where every MH decision of a step is taken,
in one `mh_accept_` launch per alpha (and cut mode).

EOS across stages (ALGORITHM.md step 3): a state that ends with EOS before the last stage jumps to
the final stage's N MH steps (L_K = T), unless params.early_stop or index="last_block". A state
that ends at a stop string (params.stop) is treated exactly like one that ends with EOS.

Mixing options (issue 22, ALGORITHM.md "Faster mixing"; arithmetic in mh_mixing.py, host mirrors in
mh_chain.py):
- index="entropy": the host keeps the state's per-token entropies h (from the sampling pass, also in
  the KV manager's `h` token buffers) and their cut weights' prefix sums, draws m ~ g(h_m) / W(x),
  and gives `mh_accept_` the index term log W(x) - log W(x') (the kernel commits h with lp/lq).
- mh_tries=k > 1: multiple-try Metropolis on 2k - 1 decode rows decoded together (mh_tries.py).
  k = 1 runs the code path above unchanged.
"""
from __future__ import annotations

import math
import time

import torch
from torch.profiler import record_function

from ... import ops
from ...sampling_params import SamplingParams
from . import mh_mixing as mix
from . import mh_tries
from .base import Policy
from .mh_chain import Chain


class MHPolicy(Policy):
    name = "mh"

    def rows(self, params: SamplingParams):
        """2k - 1 decode rows (k = mh_tries: the work row decodes the first try) and one store row."""
        return 2 * params.mh_tries - 1, 1

    def planned_tokens(self, p: SamplingParams) -> float:
        """Extension + N proposals per stage of mean suffix (L_k - lo + 1) / 2 (uniform cuts), on
        2k - 1 rows per proposal step."""
        tot = float(p.max_new_tokens)
        for k in range(1, p.num_blocks + 1):
            lo = (k - 1) * p.block_size if p.index == "last_block" else 0
            tot += p.mcmc_steps * (2 * p.mh_tries - 1) * (p.stage_limit(k) - lo + 1) / 2
        return tot

    def start(self, eng, group):
        group.state = Chain.for_group(group.params, group.seed, len(group.seqs), len(group.prompt))
        self._extend(group)

    @staticmethod
    def _base(g) -> int:
        """First cuttable position: 0, or (k-1)B for index="last_block"."""
        return (g.state.k - 1) * g.params.block_size if g.params.index == "last_block" else 0

    def on_step(self, eng, seqs):
        """Keep the per-token lp / lq / h of every segment on the host (only for the mixing options:
        they are this step's values, already on the host)."""
        for s in seqs:
            c = s.group.state
            if c.seg is not None:
                c.record(s.group.seqs.index(s), s.last_lp, s.last_lq, s.last_h)

    # ------------------------------------------------------------------ segments
    def _extend(self, g):
        c, p = g.state, g.params
        c.proposing, c.steps_done = False, 0
        c.clear_segments()
        feed = c.state[-1] if c.state else g.prompt[-1]  # the state's last token, never fed yet
        g.seqs[0].start(list(c.state), p.stage_limit(c.k), feed, buf=0)

    def _propose(self, eng, g):
        c, p, seq = g.state, g.params, g.seqs[0]
        t, P = len(c.state), len(g.prompt)
        m = c.draw_cut(self._base(g))
        c.proposing, c.cut = True, m
        c.proposed += 1
        c.clear_segments()
        eng.kv.copy_range(seq.row, g.store_rows[0], P + m, t - 1 - m, owner=g)  # back up [P+m, P+t-1)
        eng.kv.truncate(seq.row, P + m - 1)
        feed = c.state[m - 1] if m > 0 else g.prompt[-1]  # re-fed at position P + m - 1
        seq.start(c.state[:m], p.stage_limit(c.k), feed, buf=1)
        if c.tries > 1:
            mh_tries.start_helpers(eng, g, m, feed)

    def _after_state(self, eng, g):
        """The state just changed (extension ended, or an MH step was decided)."""
        c, p = g.state, g.params
        if c.steps_done < p.mcmc_steps:
            return self._propose(eng, g)
        ends_eos = (bool(c.state) and c.state[-1] in eng.eos) or c.stopped
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
        eng.finish(g, c.state, g.seqs[0].row, buf=0, accepted=c.accepted, proposed=c.proposed, extra=extra,
                   stopped=c.stopped)

    # ------------------------------------------------------------------ decisions
    def on_ended(self, eng, seqs):
        decide = []
        for s in seqs:
            g = s.group
            c = g.state
            if c.proposing and c.tries > 1:  # waits for the step's other proposal rows
                if mh_tries.row_ended(s):
                    mh_tries.decide(eng, g, self._base(g))
                    self._after_state(eng, g)
            elif c.proposing:
                decide.append(s)
            else:  # extension ended: it is the stage's state
                t_old, c.state, c.stopped = len(c.state), s.tokens, s.stopped
                c.take_segment(0, t_old)
                self._after_state(eng, g)
        keys = sorted({(s.group.params.alpha, s.group.state.entropy) for s in decide})
        for alpha, ent in keys:
            self._accept(eng, [s for s in decide if (s.group.params.alpha, s.group.state.entropy) == (alpha, ent)],
                         alpha, ent)

    def _accept(self, eng, seqs, alpha: float, entropy: bool = False):
        t0 = time.perf_counter()
        kv, dev = eng.kv, eng.device
        groups = [s.group for s in seqs]
        cur_h, prop_h = [0] * kv.n_decode, [0] * kv.n_decode
        for s in seqs:
            cur_h[s.row], prop_h[s.row] = len(s.group.state.state), len(s.tokens)
        base = [self._base(g) for g in groups]
        log_u = [math.log(1.0 - g.state.rng.random()) for g in groups]  # u in (0, 1]
        t = lambda xs, dt=torch.int64: torch.tensor(xs, dtype=dt, device=dev)  # noqa: E731
        kw = {}
        if entropy:  # log W(x) - log W(x'): x' shares x's weights below the cut
            idx = [mix.index_term(g.state.W_state(b), g.state.W(b, g.state.cut, g.state.seg[0][2]))
                   for g, b in zip(groups, base)]
            kw = dict(index_term=t(idx, torch.float32), cur_h=kv.h[0], prop_h=kv.h[1])
        with record_function("accept"):
            acc, _ = ops.mh_accept_(kv.tok[0], kv.lp[0], kv.lq[0], t(cur_h), kv.tok[1], kv.lp[1], kv.lq[1],
                                    t(prop_h), t([s.row for s in seqs]), t([g.state.cut for g in groups]),
                                    t(base), t(log_u, torch.float32), alpha, **kw)
            acc = acc.tolist()
            if kv.extra:  # log-prob buffers (logprob_rows.py) follow the accepted proposals
                won = [(s.row, s.group.state.cut, len(s.tokens)) for s, a in zip(seqs, acc) if a]
                if won:
                    kv.commit_extra(*zip(*won))
        for s, g, a in zip(seqs, groups, acc):
            c, P = g.state, len(g.prompt)
            if a:
                c.accepted += 1
                c.state, c.stopped = s.tokens, s.stopped
                c.take_segment(0, c.cut)
            else:  # restore the backed-up suffix [P+cut, P+t-1) of the current state
                kv.restore(g.store_rows[0], s.row, P + c.cut, len(c.state) - 1 - c.cut, P + len(c.state) - 1, owner=g)
            c.steps_done += 1
        eng.charge("accept_s", t0, groups)
        for g in groups:
            self._after_state(eng, g)
