"""K/V storage (`KVCache`) and its one owner in the engine (`KVManager`).

Row lengths are written in this module only: `KVCache.advance/truncate/fork` for direct users of
`Transformer.forward_cached`, and `KVManager` (which calls them) for the engine.
"""
from __future__ import annotations

from typing import Hashable, List, Optional, Sequence

import torch

from .errors import ConfigError


class KVCache:
    """Preallocated K/V for `n_rows` rows of up to `max_len` positions; each row has its own length.

    kv: [n_layers, 2, n_rows, n_kv_heads, max_len, head_dim]. Lengths live on the host
    (`host_lengths`), since the sampler's control flow knows them without a device sync.
    truncate is a length update; fork/copy_range copy positions of every layer in one op
    (`ops.kv_copy_`: a Triton kernel on CUDA)."""

    def __init__(self, cfg, n_rows: int, max_len: int, device=None, dtype=torch.float32):
        self.cfg = cfg
        self.n_rows = n_rows
        self.max_len = max_len
        self.kv = torch.zeros(
            cfg.n_layers, 2, n_rows, cfg.n_kv_heads, max_len, cfg.head_dim, device=device, dtype=dtype
        )
        self.host_lengths = [0] * n_rows

    @property
    def device(self):
        return self.kv.device

    def advance(self, rows, n: int):
        """Lengths of `rows` (a slice or a list of row indices) grow by n."""
        for r in (range(*rows.indices(self.n_rows)) if isinstance(rows, slice) else rows):
            self.host_lengths[r] += n

    def truncate(self, row: int, length: int):
        if not 0 <= length <= self.host_lengths[row]:
            raise ConfigError(f"cannot truncate row {row} of length {self.host_lengths[row]} to {length}")
        self.host_lengths[row] = length

    def _copy(self, src: Sequence[int], dst: Sequence[int], start: Sequence[int], length: Sequence[int]):
        from . import ops

        t = lambda xs: torch.tensor(list(xs), dtype=torch.int64, device=self.kv.device)  # noqa: E731
        ops.kv_copy_(self.kv, t(src), t(dst), t(start), t(length))

    def fork(self, src: Sequence[int], dst: Sequence[int], length: Sequence[int]):
        """Copy the first length[j] positions of row src[j] into row dst[j]; dst's length becomes length[j]."""
        for s, d, n in zip(src, dst, length):
            if not 0 <= n <= self.host_lengths[s]:
                raise ConfigError(f"cannot fork {n} positions from row {s} of length {self.host_lengths[s]}")
            if s == d:
                raise ConfigError(f"fork source and destination are the same row ({s})")
        self._copy(src, dst, [0] * len(src), length)
        for d, n in zip(dst, length):
            self.host_lengths[d] = n

    def copy_range(self, src: Sequence[int], dst: Sequence[int], start: Sequence[int], length: Sequence[int]):
        """Copy positions [start, start+length) of row src into row dst (lengths unchanged)."""
        self._copy(src, dst, start, length)


class KVManager:
    """The engine's K/V rows: allocation, lengths, forks, backups, moves, and per-row token buffers.

    Rows [0, n_decode) are decode rows (a decode step runs rows 0..B-1 together); rows
    [n_decode, n_decode + n_store) are store rows (backups; never decoded). Copies are queued and
    flushed right before the next forward as one `kv_copy_` launch per *wave*: a copy that reads or
    writes a row an earlier queued copy writes (or writes a row it reads) starts a new wave, so
    queued copies behave as if run in order. Typical steps need one launch.

    Per decode row, `tok/lp/lq` [2, n_decode, T] hold the sampled tokens and their log-probs
    (index 0: a policy's current sequence, 1: its proposal); they move with the row.

    `prompt_of[row]` names the prompt whose K/V positions [0, P-1) the row holds (also after the
    row is freed, until it is reused), so samples of one prompt fork it instead of prefilling.
    """

    def __init__(self, cfg, n_decode: int, n_store: int, max_len: int, max_new_tokens: int, device, dtype):
        self.cache = KVCache(cfg, n_decode + n_store, max_len, device=device, dtype=dtype)
        self.n_decode, self.n_store = n_decode, n_store
        self.free_decode = list(range(n_decode))
        self.free_store = list(range(n_decode, n_decode + n_store))
        self.prompt_of: List[Optional[Hashable]] = [None] * (n_decode + n_store)
        self.tok = torch.zeros(2, n_decode, max_new_tokens, dtype=torch.int64, device=device)
        self.lp = torch.zeros(2, n_decode, max_new_tokens, dtype=torch.float32, device=device)
        self.lq = torch.zeros(2, n_decode, max_new_tokens, dtype=torch.float32, device=device)
        self._waves: List[list] = [[]]
        self._reads, self._writes = set(), set()
        self.launches = 0

    @property
    def lengths(self) -> List[int]:
        """Row lengths (read-only view for the other parts of the engine)."""
        return self.cache.host_lengths

    # ------------------------------------------------------------------ allocation
    def alloc(self, n_decode: int, n_store: int, prompt: Hashable = None) -> Optional[tuple]:
        """Take n_decode decode rows (lowest first, a row already holding `prompt` first of all) and
        n_store store rows; None if not enough are free."""
        if len(self.free_decode) < n_decode or len(self.free_store) < n_store:
            return None
        self.free_decode.sort()
        own = [r for r in self.free_decode if prompt is not None and self.prompt_of[r] == prompt][:1]
        dec = own + [r for r in self.free_decode if r not in own][: n_decode - len(own)]
        sto = sorted(self.free_store)[:n_store]
        self.free_decode = [r for r in self.free_decode if r not in dec]
        self.free_store = [r for r in self.free_store if r not in sto]
        return sorted(dec), sto

    def free(self, rows: Sequence[int]):
        """Give rows back; they keep their K/V (a sibling may still fork their prompt)."""
        for r in rows:
            (self.free_decode if r < self.n_decode else self.free_store).append(r)

    def find_prompt(self, prompt: Hashable) -> Optional[int]:
        return next((r for r in range(self.n_decode) if self.prompt_of[r] == prompt), None)

    def set_prompt(self, row: int, prompt: Hashable, length: int):
        """`row` now holds `prompt`'s K/V up to `length` (after a prefill, or reused as is)."""
        self.prompt_of[row] = prompt
        self.cache.host_lengths[row] = length

    def n_active_rows(self) -> int:
        """1 + the highest decode row in use (0 if none)."""
        used = set(range(self.n_decode)) - set(self.free_decode)
        return max(used) + 1 if used else 0

    # ------------------------------------------------------------------ lengths
    def advance(self, rows: Sequence[int], n: int = 1):
        self.cache.advance(rows, n)

    def truncate(self, row: int, length: int):
        self.cache.truncate(row, length)

    # ------------------------------------------------------------------ queued copies
    def _queue(self, src: int, dst: int, start: int, n: int, owner=None):
        if n <= 0:
            return
        if src in self._writes or dst in self._reads or dst in self._writes:
            self._waves.append([])
            self._reads, self._writes = set(), set()
        self._waves[-1].append((src, dst, start, n, owner))
        self._reads.add(src)
        self._writes.add(dst)

    def fork(self, src: int, dsts: Sequence[int], length: int, prompt: Hashable = None, owner=None, start: int = 0):
        """Fork-many: positions [0, length) of row src into every row of dsts (lengths set).
        start > 0: the dsts already hold src's positions [0, start) (forked earlier, not rewritten
        since), so only [start, length) is copied (SPS re-forks its prefix row every token)."""
        if not 0 <= length <= self.lengths[src]:
            raise ConfigError(f"cannot fork {length} positions from row {src} of length {self.lengths[src]}")
        if not 0 <= start <= length:
            raise ConfigError(f"fork start {start} outside [0, {length}]")
        for d in dsts:
            if d == src:
                raise ConfigError(f"fork source and destination are the same row ({src})")
            self._queue(src, d, start, length - start, owner)
            self.cache.host_lengths[d] = length
            self.prompt_of[d] = prompt if prompt is not None else self.prompt_of[src]

    def copy_range(self, src: int, dst: int, start: int, n: int, owner=None):
        """Positions [start, start+n) of row src into row dst (a backup or a restore; lengths unchanged)."""
        self._queue(src, dst, start, n, owner)

    def restore(self, src: int, dst: int, start: int, n: int, length: int, owner=None):
        """Copy a backed-up range [start, start+n) of store row src back into row dst, whose length
        becomes `length` (an MH reject)."""
        self._queue(src, dst, start, n, owner)
        self.cache.host_lengths[dst] = length

    def move(self, src: int, dst: int, owner=None):
        """Move a decode row's K/V, length, prompt and token buffers to the free decode row dst; src
        becomes free (keeping its K/V)."""
        self.free_decode.remove(dst)
        self._queue(src, dst, 0, self.lengths[src], owner)
        self.cache.host_lengths[dst] = self.lengths[src]
        self.prompt_of[dst] = self.prompt_of[src]
        for buf in (self.tok, self.lp, self.lq):
            buf[:, dst] = buf[:, src]
        self.free_decode.append(src)

    def copy_buffers(self, src: Sequence[int], dst: Sequence[int]):
        """Token buffers (both, all positions) of decode rows src[j] into dst[j]: one indexed copy per
        buffer for all pairs (SMC resampling). No dst may be a src."""
        if set(src) & set(dst):
            raise ConfigError("copy_buffers: a destination row is also a source")
        if src:
            s = torch.tensor(list(src), dtype=torch.int64, device=self.tok.device)
            d = torch.tensor(list(dst), dtype=torch.int64, device=self.tok.device)
            for buf in (self.tok, self.lp, self.lq):
                buf.index_copy_(1, d, buf.index_select(1, s))

    def drop(self, owner):
        """Forget the queued backups/restores of `owner` (a group that finished: its rows' contents
        past the prompt are no longer needed). Forks and moves (start 0) stay: they carry prompt K/V
        that `prompt_of` already promises."""
        self._waves = [[c for c in w if c[4] is not owner or c[2] == 0] for w in self._waves]

    def flush(self) -> list:
        """Run the queued copies (one kv_copy_ launch per wave). Returns the owners of the copies."""
        owners = []
        for wave in self._waves:
            if wave:
                self.cache.copy_range(*zip(*(c[:4] for c in wave)))
                self.launches += 1
                owners += [c[4] for c in wave if c[4] is not None]
        self._waves, self._reads, self._writes = [[]], set(), set()
        return owners
