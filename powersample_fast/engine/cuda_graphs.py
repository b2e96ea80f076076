"""Decode steps replayed from CUDA graphs: one captured graph per (batch bucket, KV-length bucket).

A decode step is ~35 small kernels per layer; launched one by one from Python they cost more host
time than a small model's whole step on an H100. `DecodeGraphs` captures `Transformer.cached_core`
(shape-static: positions come from a device buffer, attention spans a fixed KV bucket with a
per-row mask, longrope's factor choice is made on the device) and replays it.

Buckets: batch rounded up to a multiple of `batch_multiple` (extra rows are idle slots that feed a
dummy token at position 0) and KV length rounded up to a multiple of `kv_bucket`, so a call of
3072 new tokens uses at most ~13 KV buckets per batch bucket. Graphs share one memory pool.

The same code runs eagerly on CPU (`use_graphs=False`), which is how the tests check that the
static step equals `forward_cached`.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from ..errors import ConfigError


class DecodeGraphs:
    def __init__(self, model, cache, n_rows: int, kv_bucket: int = 256, batch_multiple: int = 8,
                 use_graphs: bool = True):
        if use_graphs and cache.device.type != "cuda":
            raise ConfigError("CUDA graphs need a CUDA model; run without cuda_graphs on this device")
        self.model, self.cache = model, cache
        self.n_rows = n_rows  # decoding rows are 0..n_rows-1 (the sampler's work rows)
        self.kv_bucket, self.batch_multiple, self.use_graphs = kv_bucket, batch_multiple, use_graphs
        dev = cache.device
        self.tok = torch.zeros(n_rows, 1, dtype=torch.int64, device=dev)  # static inputs
        self.pos = torch.zeros(n_rows, 1, dtype=torch.int64, device=dev)
        self.graphs: Dict[Tuple[int, int], "torch.cuda.CUDAGraph"] = {}
        self.outputs: Dict[Tuple[int, int], torch.Tensor] = {}
        self.pool = None

    def batch_size(self, B: int) -> int:
        """The padded batch a step of B active rows runs with."""
        m = self.batch_multiple
        return min(self.n_rows, -(-B // m) * m)

    def _kv_len(self, kv_len: int) -> int:
        b = self.kv_bucket
        return min(self.cache.max_len, -(-kv_len // b) * b)

    def _fn(self, B: int, kv_len: int):
        return lambda: self.model.cached_core(self.tok[:B], self.pos[:B], self.cache, slice(0, B), kv_len, None)[:, 0]

    def step(self, feed: torch.Tensor, start_pos: torch.Tensor, B: int) -> torch.Tensor:
        """One decode position for rows 0..B-1 (B as returned by `batch_size`): feed[b] at each
        row's current length start_pos[b] (device int64 tensors [B]; start_pos must equal the
        cache's host lengths). Returns logits [B, V] (a static buffer, valid until the next step)."""
        start = self.cache.host_lengths[:B]
        kv_len = max(start) + 1
        self.model._check_len(kv_len)
        if kv_len > self.cache.max_len:
            raise ConfigError(f"KV cache holds {self.cache.max_len} positions but {kv_len} are needed")
        self.tok[:B, 0].copy_(feed)
        self.pos[:B, 0].copy_(start_pos)
        key = (B, self._kv_len(kv_len))
        if not self.use_graphs:
            out = self._fn(*key)()
        elif key in self.graphs:
            self.graphs[key].replay()
            out = self.outputs[key]
        else:
            out = self._capture(key)
        return out  # the caller advances the lengths of the rows that really decoded

    def _capture(self, key):
        fn = self._fn(*key)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (also computes this step: the K/V it writes are the step's own)
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = fn()
        self.pool = g.pool()
        self.graphs[key], self.outputs[key] = g, out
        g.replay()  # capture records without running: run the step once for real
        return out
