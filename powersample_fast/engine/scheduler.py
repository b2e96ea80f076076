"""The scheduler: admission of queued groups into free rows (prompt K/V by reuse, fork or prefill),
refill as rows free up, compaction of the decode batch, and fitting the batch to free memory."""
from __future__ import annotations

import time
import warnings
from collections import deque
from typing import Dict

from ..device import free_memory_bytes
from ..errors import ConfigError
from ..policies import get_policy
from .sequence import Phase, Seq


def fit_rows(model, want: int, max_len: int, store_per_decode: int) -> int:
    """Decode rows that fit: the KV cache (1 + store_per_decode rows per decode row) and the token
    buffers take at most 90% of the free memory of the model's device; a warning when reduced."""
    cfg = model.config
    per_pos = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * model.dtype.itemsize
    per_row = (1 + store_per_decode) * max_len * per_pos + 2 * max_len * (8 + 4 + 4)
    free = int(0.9 * free_memory_bytes(model.device))
    fit = free // per_row
    if fit < 1:
        raise ConfigError(
            f"one chain needs {per_row / 2**30:.2f} GiB of KV cache ({max_len} positions x {1 + store_per_decode} "
            f"rows) but only {free / 2**30:.2f} GiB is free on {model.device}; lower max_new_tokens or shorten the prompt"
        )
    if fit < want:
        warnings.warn(f"max_batch reduced from {want} to {fit} chains so the KV cache fits in the free memory "
                      f"of {model.device} ({per_row / 2**20:.0f} MiB per chain)", stacklevel=4)
        return fit
    return want


class Scheduler:
    def __init__(self, engine):
        self.eng = engine
        self.kv = engine.kv
        self.waiting: deque = deque()
        self.row_seq: Dict[int, Seq] = {}  # decode row -> the seq on it
        self.moves = 0

    def add(self, group):
        self.waiting.append(group)

    def remove(self, request):
        self.waiting = deque(g for g in self.waiting if g.request is not request)

    def release(self, group):
        """Free a group's rows at once (finished, failed or aborted)."""
        rows = [s.row for s in group.seqs if s.row >= 0]
        for r in rows:
            self.row_seq.pop(r, None)
        self.kv.drop(group)
        self.kv.free(rows + group.store_rows)
        for s in group.seqs:
            s.row, s.phase = -1, Phase.DONE
        group.store_rows = []

    def admit(self):
        """Admit queued groups, first come first served, while their rows are free."""
        while self.waiting:
            g = self.waiting[0]
            pol = get_policy(g.params.method)
            n_dec, n_sto = pol.rows(g.params)
            got = self.kv.alloc(n_dec, n_sto, prompt=g.request.prompt_key)
            if got is None:
                return
            self.waiting.popleft()
            self._place(g, pol, *got)

    def _place(self, g, pol, dec, sto):
        eng, kv = self.eng, self.kv
        g.t0 = t = time.perf_counter()
        key, P = g.request.prompt_key, len(g.prompt)
        head = dec[0]
        if P == 1:  # nothing to prefill: the only prompt token is fed by the first step
            kv.set_prompt(head, key, 0)
        elif kv.prompt_of[head] == key:  # this row already holds the prompt (a finished sibling's row)
            kv.truncate(head, P - 1)
        elif (src := kv.find_prompt(key)) is not None:  # fork positions [0, P-1) of a row holding it
            kv.fork(src, [head], P - 1, owner=g)
        else:  # prefill all but the last prompt token; it is fed by the first decode step
            eng.runner.prefill(head, g.prompt[:-1])
            kv.set_prompt(head, key, P - 1)
            g.positions += P - 1
            g.prefilled += P
        if len(dec) > 1:
            kv.fork(head, dec[1:], P - 1, owner=g)
        g.store_rows = list(sto)
        for s, r in zip(g.seqs, dec):
            s.row = r
            self.row_seq[r] = s
        eng.charge("prefill_s", t, [g])
        pol.start(eng, g)

    def compact(self):
        """Queue drained: move the highest decode rows into free lower rows, so the decode batch
        (rows 0..highest active) shrinks as groups finish. A move copies the row's K/V (queued) and
        its token buffers; store rows never move."""
        free = sorted(self.kv.free_decode)
        while free and self.row_seq and free[0] < max(self.row_seq):
            h, f = max(self.row_seq), free.pop(0)
            s = self.row_seq.pop(h)
            self.kv.move(h, f, owner=s.group)
            s.row = f
            self.row_seq[f] = s
            free = sorted(self.kv.free_decode)
            self.moves += 1
