"""The model runner: the one place that runs the model (prefill, decode steps, eager or CUDA graphs)
and samples. A decode step runs decode rows 0..B-1 together, one position each: active rows feed
their seq's token at their row's length; idle rows inside the batch feed a dummy token at their
length without advancing it (their K/V is left intact). Sampling is the fused sample + log-probs
(`ops.sample_logprobs`), per group of rows that share (temperature, top-k)."""
from __future__ import annotations

import time
from typing import List

import torch
from torch.profiler import record_function

from .. import ops, reference
from ..kv_cache import KVManager


class ModelRunner:
    def __init__(self, model, kv: KVManager, cuda_graphs: bool = False):
        self.model, self.kv = model, kv
        self.device = model.device
        self.graphs = None
        if cuda_graphs:
            from ..graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, kv.cache, kv.n_decode, use_graphs=self.device.type == "cuda")
        self.last_logits = None  # [B, V] of the last decode step (valid until the next one)

    def prefill(self, row: int, tokens: List[int]):
        """Compute the K/V of `tokens` into `row` from position 0 (the row's length becomes len(tokens))."""
        self.kv.flush()  # queued copies may read this row's old contents
        self.kv.truncate(row, 0)
        with record_function("prefill"):
            x = torch.tensor([tokens], dtype=torch.int64, device=self.device)
            self.model.forward_cached(x, self.kv.cache, rows=row, last_only=True)

    def decode(self, seqs, charge) -> List[tuple]:
        """One decode step for `seqs` (each on a decode row). Returns host (token, lp, lq) per seq and
        writes them into the KV manager's token buffers at (seq.buf, seq.row, len(seq.tokens))."""
        kv = self.kv
        B = kv.n_active_rows()
        if self.graphs is not None:
            B = self.graphs.batch_size(B)
        feed, keys, buf, pos, act = [0] * B, [0] * B, [0] * B, [0] * B, [0] * B
        for s in seqs:
            r = s.row
            feed[r], keys[r], buf[r], pos[r], act[r] = s.feed, reference.row_key_int(s.seed, s.draws), s.buf, len(s.tokens), 1
        t = time.perf_counter()
        with record_function("fork"):
            owners = kv.flush()
        live = [o for o in owners if not o.done] or ([s.group for s in seqs] if owners else [])
        if live:
            charge("kv_copy_s", t, list({id(g): g for g in live}.values()))
        t = time.perf_counter()
        with record_function("decode"):
            lengths = kv.lengths[:B]
            # one host->device copy: tokens, keys, buffer/position of each sampled token, mask, lengths
            inp = torch.tensor([feed, keys, buf, pos, act, lengths], dtype=torch.int64).to(self.device)
            if self.graphs is not None:
                logits = self.graphs.step(inp[0], inp[5], B)  # [B, V]
            else:
                kv_len = max(lengths) + 1
                logits = self.model.cached_core(inp[0, :, None], inp[5, :, None], kv.cache, slice(0, B), kv_len,
                                                kv_len - 1)[:, 0]  # [B, V]
        kv.advance([s.row for s in seqs])
        self.last_logits = logits
        with record_function("sample"):
            tok, lp, lq = self._sample(logits, inp[1], seqs, B)
            rows = torch.arange(B, device=self.device)
            idx = (inp[2], rows, inp[3])
            on = inp[4].bool()
            for dst, val in ((kv.tok, tok), (kv.lp, lp), (kv.lq, lq)):
                dst.index_put_(idx, torch.where(on, val, dst[idx]))  # idle rows keep their buffers
            host = torch.stack([tok.double(), lp.double(), lq.double()]).tolist()  # the one sync per step
        charge("decode_s", t, list({id(s.group): s.group for s in seqs}.values()))
        return [(int(host[0][s.row]), host[1][s.row], host[2][s.row]) for s in seqs]

    def _sample(self, logits, keys, seqs, B):
        """Fused sample + log-probs, per group of rows sharing (1/temperature, top-k); a seq's own
        `tau` overrides its group's temperature."""
        by = {}
        for s in seqs:
            tau = s.group.params.tau if s.tau is None else s.tau
            by.setdefault((1.0 / tau, s.group.params.top_k), []).append(s.row)
        if len(by) == 1:  # one setting: sample every row of the batch (idle rows' draws are ignored)
            (inv_tau, top_k), = by
            return ops.sample_logprobs(logits, keys, inv_tau, ops.topk_threshold(logits, top_k))
        tok = torch.zeros(B, dtype=torch.int64, device=self.device)
        lp = torch.zeros(B, dtype=torch.float32, device=self.device)
        lq = torch.zeros(B, dtype=torch.float32, device=self.device)
        for (inv_tau, top_k), rows in by.items():
            r = torch.tensor(rows, dtype=torch.int64, device=self.device)
            sub = logits.index_select(0, r)
            t_, p_, q_ = ops.sample_logprobs(sub, keys.index_select(0, r), inv_tau, ops.topk_threshold(sub, top_k))
            tok[r], lp[r], lq[r] = t_, p_, q_
        return tok, lp, lq

