"""The model runner: the one place that runs the model (prefills and decode steps: eager, CUDA
graphs, or on CPU replayed traces, `cpu_step.py`) and samples; it changes no row length (the KV
manager does). A decode step runs decode rows 0..B-1 together, one position each, B = 1 + the
highest row that decodes this step (held rows above it are not computed at all): active rows feed
their seq's token at their row's length; idle rows inside the batch feed a dummy token at their
length without advancing it (their K/V is left intact). Sampling is the fused sample + log-probs
(`ops.sample_logprobs`), per group of rows that share (temperature, top-k, top-p); when a seq of the
step needs it (MH with index="entropy"), the same pass also gives the entropy h of every row's base
conditional, written into the KV manager's `h` buffer beside lp/lq. Rows whose request asked for
log-probs also get the top-N pass over the same logits (`logprob_rows.py`), and a scored prompt's
prefill keeps every position's logits (`prefill_scored`)."""
from __future__ import annotations

import contextlib
import time
from typing import List, Optional

import torch
from torch.profiler import record_function

from .. import ops
from ..models import cpu_kernels, cpu_linear
from ..ops import rng
from .cpu_step import TracedDecode, cpu_trace_enabled
from .cuda_graphs import DecodeGraphs
from .kv_manager import KVManager
from .logprob_rows import CHUNK, Entry, LogprobRows, score_chunk


class ModelRunner:
    def __init__(self, model, kv: KVManager, cuda_graphs: bool = False):
        self.model, self.kv = model, kv
        self.device = model.device
        self.graphs = self.traced = None
        if cuda_graphs:
            self.graphs = DecodeGraphs(model, kv.cache, kv.n_decode, use_graphs=self.device.type == "cuda")
        elif self.device.type == "cpu" and cpu_trace_enabled():
            self.traced = TracedDecode(model, kv.cache)  # CPU: steps replayed from traces (cpu_step.py)
        # an engine of one decode row may take the one-row gemv (cpu_linear.one_row_engine);
        # one that batches runs one kernel for every row count, so no output depends on the batch
        self._one_row = cpu_linear.one_row_engine if kv.n_decode == 1 else contextlib.nullcontext
        if self.device.type == "cpu" and model.dtype in (torch.bfloat16, torch.float32):
            cpu_kernels.kernels_ready()  # built (the first time on a machine) now, not mid-step
        self.last_logits = None  # [B, V] of the last decode step (valid until the next one)
        self.last_rows = 0       # B of the last decode step: the rows it computed
        self.logprobs = LogprobRows(kv)  # top-N log-probs for the rows whose request asked

    def prefill(self, row: int, tokens: List[int], kv_mark: Optional[int] = None):
        """Compute the K/V of `tokens` into `row` at positions 0..T-1, after the queued KV copies before
        `kv_mark` (they may read this row's old contents; all queued copies if None)."""
        self.kv.copies.flush(before=kv_mark)
        with record_function("prefill"), self._one_row():
            T = len(tokens)
            x = torch.tensor([tokens], dtype=torch.int64, device=self.device)  # [1, T]
            pos = torch.arange(T, dtype=torch.int64, device=self.device)[None]  # [1, T]
            self.model.cached_core(x, pos, self.kv.cache, slice(row, row + 1), T, T - 1, last_only=True)

    def prefill_scored(self, row: int, prompt: List[int], n: int, kv_mark: Optional[int] = None) -> List[Optional[Entry]]:
        """`prefill` of prompt[:-1] in chunks of CHUNK positions, keeping every position's logits:
        returns the prompt's log-probs with the n most likely tokens, [None, entry of token 1, ...]."""
        self.kv.copies.flush(before=kv_mark)
        out: List[Optional[Entry]] = [None]
        with record_function("prefill_scored"), self._one_row():
            for a in range(0, len(prompt) - 1, CHUNK):
                b = min(a + CHUNK, len(prompt) - 1)
                x = torch.tensor([prompt[a:b]], dtype=torch.int64, device=self.device)  # [1, b - a]
                pos = torch.arange(a, b, dtype=torch.int64, device=self.device)[None]
                logits = self.model.cached_core(x, pos, self.kv.cache, slice(row, row + 1), b, b - 1)[0]
                out += score_chunk(logits, prompt[a + 1:b + 1], n)
        return out

    def decode(self, seqs, charge) -> List[tuple]:
        """One decode step for `seqs` (each on a decode row). Returns host (token, lp, lq, h) per seq
        (h: the entropy when a seq of the step needs it, else 0.0) and writes them into the KV
        manager's token buffers at (seq.buf, seq.row, len(seq.tokens))."""
        kv = self.kv
        B = max(s.row for s in seqs) + 1  # rows above the highest decoding row are idle: skipped
        if self.graphs is not None:
            B = self.graphs.batch_size(B)
        feed, keys, buf, pos, act = [0] * B, [0] * B, [0] * B, [0] * B, [0] * B
        for s in seqs:
            r = s.row
            feed[r], keys[r], buf[r], pos[r], act[r] = s.feed, rng.row_key_int(s.seed, s.draws), s.buf, len(s.tokens), 1
        t = time.perf_counter()
        with record_function("fork"):
            owners = kv.copies.flush()
        live = [o for o in owners if not o.done] or ([s.group for s in seqs] if owners else [])
        if live:
            charge("kv_copy_s", t, list({id(g): g for g in live}.values()))
        t = time.perf_counter()
        with record_function("decode"), self._one_row():
            lengths = kv.lengths[:B]
            # one host->device copy: tokens, keys, buffer/position of each sampled token, mask, lengths
            inp = torch.tensor([feed, keys, buf, pos, act, lengths], dtype=torch.int64).to(self.device)
            if self.graphs is not None:
                logits = self.graphs.step(inp[0], inp[5], B)  # [B, V]
            else:
                kv_len = max(lengths) + 1
                logits = None
                if self.traced is not None:
                    logits = self.traced.step(inp[0, :, None], inp[5, :, None], B, kv_len)
                if logits is None:
                    logits = self.model.cached_core(inp[0, :, None], inp[5, :, None], kv.cache, slice(0, B), kv_len,
                                                    kv_len - 1)[:, 0]  # [B, V]
        kv.advance([s.row for s in seqs])
        self.last_logits, self.last_rows = logits, B
        want_h = any(s.group.params.index == "entropy" for s in seqs)
        with record_function("sample"):
            tok, lp, lq, h = self._sample(logits, inp[1], seqs, B, want_h)
            want = [s for s in seqs if s.topn and s.group.params.logprobs is not None]
            if want:  # same logits, one more pass over the asking rows only
                self.logprobs.step(logits, tok, want)
            else:
                self.logprobs.clear_step()
            rows = torch.arange(B, device=self.device)
            idx = (inp[2], rows, inp[3])
            on = inp[4].bool()
            outs = ((kv.tok, tok), (kv.lp, lp), (kv.lq, lq)) + (((kv.h, h),) if want_h else ())
            for dst, val in outs:
                dst.index_put_(idx, torch.where(on, val, dst[idx]))  # idle rows keep their buffers
            host = torch.stack([v.double() for _, v in outs]).tolist()  # the one sync per step
        charge("decode_s", t, list({id(s.group): s.group for s in seqs}.values()))
        return [(int(host[0][s.row]), host[1][s.row], host[2][s.row], host[3][s.row] if want_h else 0.0)
                for s in seqs]

    def _sample(self, logits, keys, seqs, B, want_h: bool = False):
        """Fused sample + log-probs (and the entropy when want_h; else h is None), per group of rows
        sharing (1/temperature, top-k, top-p); a seq's own `tau` overrides its group's temperature."""
        by = {}
        for s in seqs:
            tau = s.group.params.tau if s.tau is None else s.tau
            by.setdefault((1.0 / tau, s.group.params.top_k, s.group.params.top_p), []).append(s.row)
        if len(by) == 1:  # one setting: sample every row of the batch (idle rows' draws are ignored)
            (inv_tau, top_k, top_p), = by
            out = ops.sample_logprobs(logits, keys, inv_tau, _threshold(logits, inv_tau, top_k, top_p), entropy=want_h)
            return out if want_h else (*out, None)
        tok = torch.zeros(B, dtype=torch.int64, device=self.device)
        lp = torch.zeros(B, dtype=torch.float32, device=self.device)
        lq = torch.zeros(B, dtype=torch.float32, device=self.device)
        h = torch.zeros(B, dtype=torch.float32, device=self.device) if want_h else None
        for (inv_tau, top_k, top_p), rows in by.items():
            r = torch.tensor(rows, dtype=torch.int64, device=self.device)
            sub = logits.index_select(0, r)
            out = ops.sample_logprobs(sub, keys.index_select(0, r), inv_tau, _threshold(sub, inv_tau, top_k, top_p),
                                      entropy=want_h)
            tok[r], lp[r], lq[r] = out[:3]
            if want_h:
                h[r] = out[3]
        return tok, lp, lq, h


def _threshold(logits, inv_tau, top_k, top_p):
    """The sampling kernel's per-row mask: top-k's threshold, raised to top-p's (ops/nucleus.py) if set."""
    thr = ops.topk_threshold(logits, top_k)
    return thr if top_p is None else ops.topp_threshold(logits, inv_tau, top_p, thr)

