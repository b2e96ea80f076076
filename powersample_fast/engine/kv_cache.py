"""`KVCache`: preallocated K/V for a fixed number of rows, each with its own length (host-side).

Row lengths are written by one method, `set_lengths`. The engine calls it only through its
`KVManager` (kv_manager.py); `advance/truncate/fork` here serve direct users of
`Transformer.forward_cached`.
"""
from __future__ import annotations

from typing import Iterable, Sequence, Union

import torch

from .. import ops
from ..device import default_dtype
from ..errors import ConfigError


class KVCache:
    """Preallocated K/V for `n_rows` rows of up to `max_len` positions; each row has its own length.

    kv: [n_layers, 2, n_rows, n_kv_heads, max_len, head_dim]. Lengths live on the host
    (`host_lengths`, read-only to everyone but `set_lengths`), since the sampler's control flow knows
    them without a device sync. truncate is a length update; fork/copy_range copy positions of every
    layer in one op (`ops.kv_copy_`: a Triton kernel on CUDA)."""

    def __init__(self, cfg, n_rows: int, max_len: int, device=None, dtype=None):
        """dtype None: the dtype a model loads in by default on `device` (`device.default_dtype`), so a
        cache built beside a default-loaded model matches it on every CPU."""
        if dtype is None:
            dtype = default_dtype(device if device is not None else "cpu")
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

    def set_lengths(self, rows: Iterable[int], lengths: Union[int, Sequence[int]]):
        """The one writer of row lengths: row rows[j] now holds lengths[j] positions (one int: all)."""
        rows = list(rows)
        for r, n in zip(rows, [lengths] * len(rows) if isinstance(lengths, int) else lengths):
            self.host_lengths[r] = n

    def advance(self, rows, n: int):
        """Lengths of `rows` (a slice or a list of row indices) grow by n."""
        rows = range(*rows.indices(self.n_rows)) if isinstance(rows, slice) else rows
        self.set_lengths(rows, [self.host_lengths[r] + n for r in rows])

    def truncate(self, row: int, length: int):
        if not 0 <= length <= self.host_lengths[row]:
            raise ConfigError(f"cannot truncate row {row} of length {self.host_lengths[row]} to {length}")
        self.set_lengths([row], length)

    def _copy(self, src: Sequence[int], dst: Sequence[int], start: Sequence[int], length: Sequence[int]):
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
        self.set_lengths(dst, length)

    def copy_range(self, src: Sequence[int], dst: Sequence[int], start: Sequence[int], length: Sequence[int]):
        """Copy positions [start, start+length) of row src into row dst (lengths unchanged)."""
        self._copy(src, dst, start, length)
