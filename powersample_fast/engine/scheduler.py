"""The scheduler: admission of queued groups into free rows, refill as rows free up, compaction of the
decode batch, and the checks a request passes before it is queued. It plans; it runs nothing: each
step's plan (`SchedulerOutput`: the groups admitted, the prefills they need) is executed by the
engine through the model runner and the policies."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import List, Optional

from ..errors import ConfigError
from ..sampling_params import SamplingParams
from .kv_manager import KVManager
from .policies import get_policy
from .sequence import Group, Phase, Seq


@dataclass
class Prefill:
    """Compute the K/V of `tokens` into `row` from position 0 (the row's length is already set),
    after the KV copies queued before `kv_mark` (they may read the row's old contents) have run."""

    group: Group
    row: int
    tokens: List[int]
    kv_mark: int
    score: Optional[int] = None  # params.prompt_logprobs N: keep every position's logits and score the prompt


@dataclass
class SchedulerOutput:
    admitted: List[Group] = field(default_factory=list)  # placed this step, in admission order: start them
    prefills: List[Prefill] = field(default_factory=list)


class Scheduler:
    def __init__(self, kv: KVManager):
        self.kv = kv
        self.waiting: deque = deque()
        self.moves = 0

    def add(self, group: Group):
        self.waiting.append(group)

    def remove(self, request):
        self.waiting = deque(g for g in self.waiting if g.request is not request)

    def release(self, group: Group):
        """Free a group's rows at once (finished, failed or aborted)."""
        self.kv.copies.drop(group)
        self.kv.free([s.row for s in group.seqs if s.row >= 0] + group.store_rows)
        for s in group.seqs:
            s.row, s.phase = -1, Phase.DONE
        group.store_rows = []

    def decoding(self) -> List[Seq]:
        """The seqs that decode this step, lowest row first (the KV manager says who holds a row)."""
        return [s for s in self.kv.decode_holders() if s.phase is Phase.DECODING]

    def schedule(self) -> SchedulerOutput:
        """Admit queued groups into free rows.

        NOTE: first come first served, and a group is admitted whole (all its decode and store rows)
        or not at all, so the queue's head waits for rows rather than being overtaken. A group's
        prompt K/V [0, P-1) comes from the cheapest source: its own row already holds it (a finished
        sibling's), or a fork of a row that does, or a prefill; its other decode rows fork its head. A
        request that scores its prompt (params.prompt_logprobs) prefills it for its first group (the
        first admitted), a prefill that keeps every position's logits."""
        out = SchedulerOutput()
        while self.waiting:
            g = self.waiting[0]
            _, n_sto = get_policy(g.params.method).rows(g.params)
            got = self.kv.alloc(g.seqs, n_sto, prompt=g.request.prompt_key, store_holder=g)
            if got is None:
                break
            self.waiting.popleft()
            self._place(g, *got, out)
        return out

    def _place(self, g: Group, dec: List[int], sto: List[int], out: SchedulerOutput):
        kv = self.kv
        g.t0 = time.perf_counter()
        key, P = g.request.prompt_key, len(g.prompt)
        head = dec[0]
        if g.params.prompt_logprobs is not None and g.index == 0:  # scored (once per request: its first group)
            out.prefills.append(Prefill(g, head, g.prompt[:-1], kv.copies.barrier(), g.params.prompt_logprobs))
            kv.set_prompt(head, key, P - 1)
            g.positions += P - 1
            g.prefilled += P if P > 1 else 0
        elif P == 1:  # nothing to prefill: the only prompt token is fed by the first step
            kv.set_prompt(head, key, 0)
        elif kv.prompt_of[head] == key:  # this row already holds the prompt (a finished sibling's row)
            kv.truncate(head, P - 1)
        elif (src := kv.find_prompt(key)) is not None:  # fork positions [0, P-1) of a row holding it
            kv.fork(src, [head], P - 1, owner=g)
        else:  # prefill all but the last prompt token; it is fed by the first decode step
            out.prefills.append(Prefill(g, head, g.prompt[:-1], kv.copies.barrier()))
            kv.set_prompt(head, key, P - 1)
            g.positions += P - 1
            g.prefilled += P
        if len(dec) > 1:
            kv.fork(head, dec[1:], P - 1, owner=g)
        g.store_rows = list(sto)
        for s, r in zip(g.seqs, dec):
            s.row = r
        out.admitted.append(g)

    def compact(self):
        """Queue drained: move the highest decode rows into free lower rows, so the decode batch
        (rows 0..highest active) shrinks as groups finish. A move copies the row's K/V (queued) and
        its token buffers; store rows never move."""
        kv = self.kv
        while kv.free_decode and kv.free_decode[0] < (h := kv.highest_held()):
            f = kv.free_decode[0]
            s = kv.holder[h]
            kv.move(h, f, owner=s.group)
            s.row = f
            self.moves += 1


def check_request(cfg, max_len: int, kv: KVManager, ids: List[int], p: SamplingParams, index: int = 0,
                  tokenizer=None):
    """ConfigError naming the problem if prompt `index` (token ids) cannot run with `p` (on an engine
    with this tokenizer: stop strings need one)."""
    if p.stop and tokenizer is None:
        raise ConfigError("stop strings need the model's tokenizer (this engine has none); "
                          "pass one, or stop on token ids with eos_token_ids")
    V, ctx = cfg.vocab_size, cfg.max_seq_len
    bad = [x for x in ids if not 0 <= x < V]
    if bad:
        raise ConfigError(f"prompt {index} has token id(s) outside the vocabulary [0, {V}): {bad[:5]}")
    for limit, what in ((ctx, "the model's context"), (max_len, "the engine's max_len")):
        if len(ids) + p.max_new_tokens > limit:
            raise ConfigError(
                f"prompt {index} has {len(ids)} tokens; with max_new_tokens={p.max_new_tokens} that exceeds "
                f"{what} of {limit} tokens; shorten the prompt or lower max_new_tokens")
    n_dec, n_sto = get_policy(p.method).rows(p)
    if n_dec > kv.n_decode or n_sto > kv.n_store:
        raise ConfigError(f"method {p.method!r} needs {n_dec} decode and {n_sto} store rows per sample but the "
                          f"engine has {kv.n_decode} and {kv.n_store}; raise max_batch")
