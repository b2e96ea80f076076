"""Torch reference ("spec") of the top-N log-prob kernel ``csrc_triton.topn.topn_logprobs``, and the
implementation used on CPU tensors (see ``ops.topn_logprobs``).

Log-probs are the base model's at temperature 1, over the full vocabulary, from logits a step has
already computed (a decode step's, or a scored prompt's prefill): no second model forward. Every
value of one row is ``z_i - lse(z)`` with one ``lse`` per row, so when the given token is the row's
most likely token its own log-prob and the first top-N value are the same float, bit for bit (what
lm-eval's ``is_greedy`` compares: ``token_logprob == max(top_logprobs.values())``).
"""
from __future__ import annotations

import torch


def topn_logprobs(logits: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, n: int):
    """logits: [B, V] (fp32/bf16/fp16); rows: [R] int64 row indices into logits; tokens: [R] int64
    (a token per selected row); n >= 0. Returns (own [R] fp32, ids [R, n] int64, vals [R, n] fp32):
      own[r]  = z[rows[r], tokens[r]] - lse(z[rows[r]])
      ids[r]  = the n most likely tokens of row rows[r], most likely first (ties: lower id first)
      vals[r] = their log-probs, z - lse(z) with the same lse.
    Non-finite logits give non-finite values (callers check)."""
    z = logits.index_select(0, rows.to(torch.int64)).float()  # [R, V]
    lse = torch.logsumexp(z, dim=-1)  # [R]
    own = z.gather(1, tokens.to(torch.int64)[:, None])[:, 0] - lse
    if n == 0:
        return own, torch.zeros(len(rows), 0, dtype=torch.int64, device=z.device), z.new_zeros(len(rows), 0)
    k = min(n, z.shape[-1])
    # every token tied with the k-th largest logit, so that ties resolve by id (topk's order among
    # equal values is unspecified): topk over k + ties, then order by (value desc, id asc), keep k
    kth = torch.topk(z, k, dim=-1).values[:, -1:]
    wide = int((z >= kth).sum(-1).max())
    v, i = torch.topk(z, wide, dim=-1)
    key = torch.argsort(i, dim=-1, stable=True)
    v, i = v.gather(1, key), i.gather(1, key)
    order = torch.argsort(-v, dim=-1, stable=True)
    v, i = v.gather(1, order)[:, :k], i.gather(1, order)[:, :k]
    return own, i, v - lse[:, None]
