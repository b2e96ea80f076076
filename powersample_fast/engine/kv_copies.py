"""`CopyQueue`: the K/V copies the KV manager queues (forks, backups, restores, moves), run right before
the next forward as one `kv_copy_` launch per wave."""
from __future__ import annotations

from typing import List, Optional

from .kv_cache import KVCache


class CopyQueue:
    """K/V copies (src row, dst row, start, n, owner) queued by the KV manager and run right before
    the next forward as one `kv_copy_` launch per *wave*: a copy that reads or writes a row an earlier
    queued copy writes (or writes a row it reads) starts a new wave, so queued copies behave as if
    run in order. Typical steps need one launch. `barrier()` closes the open wave, so
    `flush(before=mark)` can run the copies queued before a prefill that overwrites a row they read,
    and keep the ones queued after it."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self._waves: List[list] = [[]]
        self._first_wave = 0  # index of _waves[0] among every wave queued so far (barrier marks)
        self._reads, self._writes = set(), set()
        self.launches = 0

    def queue(self, src: int, dst: int, start: int, n: int, owner=None):
        if n <= 0:
            return
        if src in self._writes or dst in self._reads or dst in self._writes:
            self.barrier()
        self._waves[-1].append((src, dst, start, n, owner))
        self._reads.add(src)
        self._writes.add(dst)

    def drop(self, owner):
        """Forget the queued backups/restores of `owner` (a group that finished: its rows' contents
        past the prompt are no longer needed). Forks and moves (start 0) stay: they carry prompt K/V
        that the KV manager's `prompt_of` already promises."""
        self._waves = [[c for c in w if c[4] is not owner or c[2] == 0] for w in self._waves]

    def barrier(self) -> int:
        """Close the open wave; returns a mark: `flush(before=mark)` runs exactly the copies queued
        before this call."""
        if self._waves[-1]:
            self._waves.append([])
            self._reads, self._writes = set(), set()
        return self._first_wave + len(self._waves) - 1

    def flush(self, before: Optional[int] = None) -> list:
        """Run the queued copies (one kv_copy_ launch per wave), or only those queued before the mark
        `before` (see `barrier`). Returns the owners of the copies run."""
        n = len(self._waves) if before is None else max(0, before - self._first_wave)
        run, self._waves = self._waves[:n], self._waves[n:]
        self._first_wave += n
        if not self._waves:
            self._waves, self._reads, self._writes = [[]], set(), set()
        owners = []
        for wave in run:
            if wave:
                self.cache.copy_range(*zip(*(c[:4] for c in wave)))
                self.launches += 1
                owners += [c[4] for c in wave if c[4] is not None]
        return owners
