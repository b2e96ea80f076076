"""Log-probs a request asked for (`SamplingParams.logprobs` / `prompt_logprobs`), from logits the
engine computes anyway: the top-N pass (`ops.topn_logprobs`, kernel `csrc_triton/topn.py`) runs
over a decode step's logits for the rows whose request asked, and over a scored prompt's prefill
logits. No second model forward.

Generated tokens: per decode row and token-buffer slot, like `KVManager.tok/lp/lq` [2, D, T],
`own` [2, D, T] (the token's log p from the top-N pass: bit-consistent with the top values) and
`ids`/`vals` [2, D, T, N]. They are allocated when a request first asks (N: the largest N asked
so far; they grow) and registered with the KV manager (`KVManager.set_extra`), so they move with
their rows (compaction, SMC resampling) and an MH accept commits them (`KVManager.commit_extra`).
Memory: 2 x rows x positions x (4 + 8N) bytes (N = 20, 8 rows of 2048 positions: 5.4 MB). SPS
picks its kept tokens on the host and hands their entries to `EngineContext.finish` instead.

Prompt tokens: `ModelRunner.prefill_scored` prefills the prompt (all but its last token, which the
first decode step feeds) in chunks of CHUNK positions keeping every position's logits, instead of
the last one's only, and `score_chunk` turns each chunk's logits into entries; entry i (i >= 1)
scores prompt token i, entry 0 is None.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from .. import ops

CHUNK = 256  # prefill positions per forward of a scored prompt: logits [CHUNK, V] at a time

Entry = Tuple[float, List[Tuple[int, float]]]  # (the token's log p, [(id, log p)] most likely first)
Logprobs = Tuple[List[float], List[List[Tuple[int, float]]]]  # a result's (own log-probs, top-N lists)


class LogprobRows:
    """The generated tokens' top-N buffers (owned by the model runner, which runs the pass)."""

    def __init__(self, kv):
        self.kv = kv
        self.n = -1  # N of the buffers (-1: none yet)
        self.own = self.ids = self.vals = None
        self.last = None  # (seqs, own, ids, vals) of the last decode step's top-N pass (device)
        self._host = None

    def ensure(self, n: int):
        """Buffers for at least n top tokens per position."""
        if n <= self.n:
            return
        kv = self.kv
        _, D, T = kv.lp.shape
        own = torch.full((2, D, T), float("nan"), dtype=torch.float32, device=kv.lp.device)
        ids = torch.zeros(2, D, T, n, dtype=torch.int32, device=kv.lp.device)
        vals = torch.full((2, D, T, n), float("nan"), dtype=torch.float32, device=kv.lp.device)
        if self.own is not None:  # requests in flight keep theirs
            own.copy_(self.own)
            ids[..., :self.n] = self.ids
            vals[..., :self.n] = self.vals
        self.n, self.own, self.ids, self.vals = n, own, ids, vals
        kv.set_extra([own, ids, vals])

    def step(self, logits: torch.Tensor, tok: torch.Tensor, seqs) -> None:
        """The top-N pass of a decode step for `seqs` (rows whose request asked), written at each
        seq's (buf, row, position of the token just sampled)."""
        n = max(s.group.params.logprobs for s in seqs)
        self.ensure(n)
        dev = logits.device
        rows = torch.tensor([s.row for s in seqs], dtype=torch.int64, device=dev)
        own, ids, vals = ops.topn_logprobs(logits, rows, tok.index_select(0, rows), n)
        at = (torch.tensor([s.buf for s in seqs], device=dev), rows,
              torch.tensor([len(s.tokens) for s in seqs], device=dev))
        self.own.index_put_(at, own)
        k = ids.shape[1]
        self.ids[..., :k].index_put_(at, ids.to(torch.int32))
        self.vals[..., :k].index_put_(at, vals)
        self.last, self._host = (seqs, own, ids, vals), None

    def clear_step(self):
        self.last, self._host = None, None

    def step_entry(self, seq) -> Optional[Entry]:
        """Host copy of `seq`'s entry of the last step (one sync per step, on first use: streaming)."""
        if self.last is None:
            return None
        if self._host is None:
            seqs, own, ids, vals = self.last
            self._host = {id(s): i for i, s in enumerate(seqs)}, own.tolist(), ids.tolist(), vals.tolist()
        index, own, ids, vals = self._host
        i = index.get(id(seq))
        if i is None:
            return None
        n = seq.group.params.logprobs
        return own[i], list(zip(ids[i][:n], vals[i][:n]))

    def read(self, buf: int, row: int, t: int, n: int) -> Logprobs:
        """The first t positions of (buf, row): (own log-probs, top-n lists)."""
        if self.n < 0 or t == 0 or row < 0:
            return [float("nan")] * t, [[] for _ in range(t)]
        own = self.own[buf, row, :t].tolist()
        k = min(n, self.n)
        ids, vals = self.ids[buf, row, :t, :k].tolist(), self.vals[buf, row, :t, :k].tolist()
        return own, [[(i, v) for i, v in zip(a, b) if not math.isnan(v)] for a, b in zip(ids, vals)]

    def for_result(self, buf: int, row: int, t: int, n: int, entries: Optional[List[Entry]] = None) -> Logprobs:
        """A result's log-probs: host `entries` (a policy that picks tokens on the host: sps) or the
        first t positions of (buf, row)."""
        if entries is None:
            return self.read(buf, row, t, n)
        return [e[0] for e in entries], [list(e[1]) for e in entries]


def score_chunk(logits: torch.Tensor, targets: Sequence[int], n: int) -> List[Entry]:
    """Entries of `targets` [T] scored by `logits` [T, V] (position i's logits score targets[i])."""
    dev = logits.device
    own, ids, vals = ops.topn_logprobs(logits, torch.arange(len(targets), device=dev),
                                       torch.tensor(list(targets), dtype=torch.int64, device=dev), n)
    return [(o, list(zip(i, v))) for o, i, v in zip(own.tolist(), ids.tolist(), vals.tolist())]
