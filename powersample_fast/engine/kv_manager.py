"""`KVManager`: the engine's one owner of K/V rows and of everything per row: which rows are held
and by whom, each row's length (`_set_lengths`, the engine's one writer of lengths), the prompt a
row holds, forks / backups / restores / moves (queued in a `CopyQueue`, kv_copies.py), and the
per-row token buffers. `fit_rows` sizes the cache to the device's free memory; `common_prefix` says
which positions a fork between rows holding two token lists can skip.

Memory levels: the K/V of every row (`cache.kv`) and the token buffers live on the model's device;
the lengths, holders and the copy queue live on the host, so no decision needs a device sync.
"""
from __future__ import annotations

import warnings
from typing import Hashable, List, Optional, Sequence, Union

import torch

from ..device import free_memory_bytes
from ..errors import ConfigError
from .kv_cache import KVCache
from .kv_copies import CopyQueue


class KVManager:
    """The engine's K/V rows: holders, lengths, forks, backups, moves, and per-row token buffers.

    Rows [0, n_decode) are decode rows (a decode step runs rows 0..B-1 together); rows
    [n_decode, n_decode + n_store) are store rows (backups; never decoded). `holder[row]` is the one
    record of occupancy: None for a free row, else what holds it (the engine puts a Seq on a decode
    row and its Group on a store row); a row is free exactly when its holder is None.

    K/V copies (forks, backups, restores, moves) are queued in `copies` (a `CopyQueue`) and run
    right before the next forward, one `kv_copy_` launch per wave.

    Per decode row, `tok/lp/lq` [2, n_decode, T] hold the sampled tokens and their log-probs
    (index 0: a policy's current sequence, 1: its proposal), and `h` the entropy of the base
    conditional each token was sampled from (written only by steps that compute it: MH with
    index="entropy"); they move with the row, and so do the `extra` buffers [2, n_decode, T, ...]
    registered with `set_extra` (the returned log-probs, logprob_rows.py), which an MH accept commits
    with `commit_extra` (`buffers`: all of them).

    `prompt_of[row]` names the prompt whose K/V positions [0, P-1) the row holds (also after the
    row is freed, until it is reused), so samples of one prompt fork it instead of prefilling.
    """

    def __init__(self, cfg, n_decode: int, n_store: int, max_len: int, max_new_tokens: int, device, dtype):
        self.cache = KVCache(cfg, n_decode + n_store, max_len, device=device, dtype=dtype)
        self.n_decode, self.n_store = n_decode, n_store
        self.holder: List[Optional[object]] = [None] * (n_decode + n_store)
        self.prompt_of: List[Optional[Hashable]] = [None] * (n_decode + n_store)
        self.tok = torch.zeros(2, n_decode, max_new_tokens, dtype=torch.int64, device=device)
        self.lp = torch.zeros(2, n_decode, max_new_tokens, dtype=torch.float32, device=device)
        self.lq = torch.zeros(2, n_decode, max_new_tokens, dtype=torch.float32, device=device)
        self.h = torch.zeros(2, n_decode, max_new_tokens, dtype=torch.float32, device=device)
        self.extra: List[torch.Tensor] = []
        self.copies = CopyQueue(self.cache)

    @property
    def buffers(self) -> tuple:
        """Every per-row token buffer, [2, n_decode, T, ...]: tok, lp, lq, h and the `extra` ones."""
        return (self.tok, self.lp, self.lq, self.h, *self.extra)

    # ------------------------------------------------------------------ occupancy
    @property
    def free_decode(self) -> List[int]:
        return [r for r in range(self.n_decode) if self.holder[r] is None]

    @property
    def free_store(self) -> List[int]:
        return [r for r in range(self.n_decode, self.n_decode + self.n_store) if self.holder[r] is None]

    def decode_holders(self) -> list:
        """The holders of the decode rows in use, lowest row first."""
        return [h for h in self.holder[:self.n_decode] if h is not None]

    def highest_held(self) -> int:
        """The highest decode row in use (-1 if none)."""
        return max((r for r in range(self.n_decode) if self.holder[r] is not None), default=-1)

    def n_active_rows(self) -> int:
        """1 + the highest decode row in use (0 if none)."""
        return self.highest_held() + 1

    def alloc(self, holders: Sequence, n_store: int, prompt: Hashable = None, store_holder=None) -> Optional[tuple]:
        """One decode row per holder (lowest first, a free row already holding `prompt` first of all;
        holders[j] gets the j-th lowest of them) and n_store store rows held by `store_holder`.
        Returns (decode rows, store rows), or None if not enough rows are free."""
        free_dec, free_sto = self.free_decode, self.free_store
        if len(free_dec) < len(holders) or len(free_sto) < n_store:
            return None
        own = [r for r in free_dec if prompt is not None and self.prompt_of[r] == prompt][:1]
        dec = sorted(own + [r for r in free_dec if r not in own][: len(holders) - len(own)])
        sto = free_sto[:n_store]
        for r, h in zip(dec, holders):
            self.holder[r] = h
        for r in sto:
            self.holder[r] = store_holder
        return dec, sto

    def free(self, rows: Sequence[int]):
        """Give rows back; they keep their K/V (a sibling may still fork their prompt)."""
        for r in rows:
            self.holder[r] = None

    def find_prompt(self, prompt: Hashable) -> Optional[int]:
        return next((r for r in range(self.n_decode) if self.prompt_of[r] == prompt), None)

    def set_prompt(self, row: int, prompt: Hashable, length: int):
        """`row` now holds `prompt`'s K/V up to `length` (after a prefill, or reused as is)."""
        self.prompt_of[row] = prompt
        self._set_lengths([row], length)

    # ------------------------------------------------------------------ lengths
    @property
    def lengths(self) -> List[int]:
        """Row lengths (read-only view for the other parts of the engine)."""
        return self.cache.host_lengths

    def _set_lengths(self, rows: Sequence[int], lengths: Union[int, Sequence[int]]):
        """The engine's one writer of row lengths."""
        self.cache.set_lengths(rows, lengths)

    def advance(self, rows: Sequence[int], n: int = 1):
        self._set_lengths(rows, [self.lengths[r] + n for r in rows])

    def truncate(self, row: int, length: int):
        if not 0 <= length <= self.lengths[row]:
            raise ConfigError(f"cannot truncate row {row} of length {self.lengths[row]} to {length}")
        self._set_lengths([row], length)

    # ------------------------------------------------------------------ queued copies
    def fork(self, src: int, dsts: Sequence[int], length: int, prompt: Hashable = None, owner=None, start: int = 0):
        """Fork-many: positions [0, length) of row src into every row of dsts (lengths set).
        start > 0: the dsts already hold src's positions [0, start) (forked earlier, not rewritten
        since), so only [start, length) is copied (SPS forks a prefix once per token or block)."""
        if not 0 <= length <= self.lengths[src]:
            raise ConfigError(f"cannot fork {length} positions from row {src} of length {self.lengths[src]}")
        if not 0 <= start <= length:
            raise ConfigError(f"fork start {start} outside [0, {length}]")
        for d in dsts:
            if d == src:
                raise ConfigError(f"fork source and destination are the same row ({src})")
            self.copies.queue(src, d, start, length - start, owner)
            self._set_lengths([d], length)
            self.prompt_of[d] = prompt if prompt is not None else self.prompt_of[src]

    def copy_range(self, src: int, dst: int, start: int, n: int, owner=None):
        """Positions [start, start+n) of row src into row dst (a backup or a restore; lengths unchanged)."""
        self.copies.queue(src, dst, start, n, owner)

    def restore(self, src: int, dst: int, start: int, n: int, length: int, owner=None):
        """Copy a backed-up range [start, start+n) of row src back into row dst, whose length becomes
        `length` (an MH reject, from the store row; a multiple-try accept, from the selected try's row)."""
        self.copies.queue(src, dst, start, n, owner)
        self._set_lengths([dst], length)

    def move(self, src: int, dst: int, owner=None):
        """Move a decode row's holder, K/V, length, prompt and token buffers to the free decode row
        dst; src becomes free (keeping its K/V)."""
        if self.holder[dst] is not None:
            raise ConfigError(f"cannot move row {src} into row {dst}: it is in use")
        self.copies.queue(src, dst, 0, self.lengths[src], owner)
        self._set_lengths([dst], self.lengths[src])
        self.prompt_of[dst] = self.prompt_of[src]
        for buf in self.buffers:
            buf[:, dst] = buf[:, src]
        self.holder[dst], self.holder[src] = self.holder[src], None

    def copy_buffers(self, src: Sequence[int], dst: Sequence[int]):
        """Token buffers (both, all positions) of decode rows src[j] into dst[j]: one indexed copy per
        buffer for all pairs (SMC resampling). No dst may be a src."""
        if set(src) & set(dst):
            raise ConfigError("copy_buffers: a destination row is also a source")
        if src:
            s = torch.tensor(list(src), dtype=torch.int64, device=self.tok.device)
            d = torch.tensor(list(dst), dtype=torch.int64, device=self.tok.device)
            for buf in self.buffers:
                buf.index_copy_(1, d, buf.index_select(1, s))

    def take_proposal(self, src: int, dst: int, start: int, end: int):
        """Positions [start, end) of decode row src's proposal buffers (index 1) into row dst's
        current buffers (index 0), every token buffer (a multiple-try MH accept of the try on src)."""
        for buf in self.buffers:
            buf[0, dst, start:end] = buf[1, src, start:end]

    # ------------------------------------------------------------------ more token buffers
    def set_extra(self, bufs: Sequence[torch.Tensor]):
        """Token buffers [2, n_decode, T, ...] that move with their rows like tok/lp/lq (they replace
        the previous ones, whose contents the caller has copied over)."""
        for b in bufs:
            if tuple(b.shape[:3]) != tuple(self.tok.shape):
                raise ConfigError(f"extra token buffer of shape {tuple(b.shape)}; needs {tuple(self.tok.shape)} first")
        self.extra = list(bufs)

    def commit_extra(self, rows: Sequence[int], starts: Sequence[int], ends: Sequence[int]):
        """An MH accept for the `extra` buffers (`mh_accept_` commits tok/lp/lq): positions
        [start, end) of buffer 1 into buffer 0 of each row."""
        for buf in self.extra:
            for r, a, b in zip(rows, starts, ends):
                buf[0, r, a:b] = buf[1, r, a:b]


def common_prefix(a: list, b: list) -> int:
    """Length of the longest common prefix of two token lists (binary search over slice equality,
    which runs in C: O(n log n) element compares at C speed, for lists of thousands of tokens): for
    two rows that encode these token lists, the positions a fork between them need not copy
    (`KVManager.fork`'s start; sps_block.py tracks its rows' contents this way)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # a[:lo] == b[:lo] and a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def fit_rows(model, want: int, max_len: int, store_per_decode: float) -> int:
    """Decode rows that fit: the KV cache (1 + store_per_decode rows per decode row) and the token
    buffers take at most 90% of the free memory of the model's device; a warning when reduced."""
    cfg = model.config
    per_pos = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * model.dtype.itemsize
    per_row = (1 + store_per_decode) * max_len * per_pos + 2 * max_len * (8 + 4 + 4 + 4)  # tok, lp, lq, h
    free = int(0.9 * free_memory_bytes(model.device))
    fit = int(free // per_row)  # store_per_decode may be a fraction (mh_tries: 1 store row per 2k - 1)
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
