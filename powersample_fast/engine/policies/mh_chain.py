"""`Chain`: the state of one MH chain (`group.state` of the `mh` policy), with the host mirrors the
mixing options need (issue 22): the current state's per-token entropies and the prefix sums of its
cut weights (index="entropy"), its per-token lp / lq (mh_tries > 1), and the lp / lq / h of every
segment being decoded. Algorithm 1 as written (uniform or last_block cuts, one try) keeps none of
them: its per-token values live only in the KV manager's token buffers."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import List, Optional

from ...sampling_params import SamplingParams
from . import mh_mixing as mix


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
    stopped: bool = False          # the state ends at a stop string (treated as EOS: ALGORITHM.md "Stop strings")
    # mixing options (host mirrors, kept only when needed)
    entropy: bool = False          # index="entropy": hs / cum of the state are kept
    tries: int = 1                 # mh_tries: lps / lqs of the state are kept when > 1
    eps: float = 0.1               # cut weight g(h) = eps + h ** beta (index="entropy")
    beta: float = 1.0
    hs: List[float] = field(default_factory=list)    # state's per-token entropies
    cum: List[float] = field(default_factory=lambda: [0.0])  # prefix sums of the state's cut weights
    lps: List[float] = field(default_factory=list)   # state's per-token lp / lq (tries > 1)
    lqs: List[float] = field(default_factory=list)
    seg: Optional[list] = None     # per seq of the group: [lp list, lq list, h list] of its segment
    pending: int = 0               # multiple-try: proposal rows still decoding
    synced: int = 0                # multiple-try: helper rows hold the work row's K/V [0, synced)

    @classmethod
    def for_group(cls, p: SamplingParams, seed: int, n_seqs: int, prompt_len: int) -> "Chain":
        c = cls(random.Random(seed), entropy=p.index == "entropy", tries=p.mh_tries, eps=p.entropy_eps,
                beta=p.entropy_beta)
        if c.entropy or c.tries > 1:
            c.seg = [[[], [], []] for _ in range(n_seqs)]
        c.synced = max(prompt_len - 1, 0)  # the scheduler forked the prompt into every row
        return c

    # ------------------------------------------------------------------ segments
    def record(self, j: int, lp: float, lq: float, h: float):
        """Seq j of the group sampled a token with these lp / lq / h (mixing options only)."""
        if self.seg is not None:
            seg = self.seg[j]
            seg[0].append(lp)
            seg[1].append(lq)
            seg[2].append(h)

    def clear_segments(self):
        if self.seg is not None:
            for seg in self.seg:
                for xs in seg:
                    xs.clear()

    def take_segment(self, j: int, m: int):
        """The state became x_<m + segment j's tokens: update the host mirrors."""
        lp, lq, hs = self.seg[j] if self.seg is not None else ([], [], [])
        if self.entropy:
            self.hs = self.hs[:m] + hs
            self.cum = self.cum[:m + 1]
            for w in mix.cut_weights(hs, self.eps, self.beta):
                self.cum.append(self.cum[-1] + w)
        if self.tries > 1:
            self.lps, self.lqs = self.lps[:m] + lp, self.lqs[:m] + lq

    # ------------------------------------------------------------------ cut weights
    def draw_cut(self, lo: int) -> int:
        """The cut m in [lo, t): uniform (Algorithm 1), or with probability g(h_m) / W(x)."""
        t = len(self.state)
        if self.entropy:
            return mix.draw_cut(self.cum, lo, t, self.rng.random())
        return lo + self.rng.randrange(t - lo)

    def W(self, lo: int, m: int, hs: List[float]) -> float:
        """Cut-weight total over [lo, .) of x_<m followed by a suffix with entropies hs (uniform cuts:
        its number of cut positions)."""
        if self.entropy:
            return self.cum[m] - self.cum[lo] + math.fsum(mix.cut_weights(hs, self.eps, self.beta))
        return m + len(hs) - lo

    def W_state(self, lo: int) -> float:
        """W(x) of the current state."""
        t = len(self.state)
        return self.cum[t] - self.cum[lo] if self.entropy else t - lo
