"""Nucleus (top-p) sampling for method "plain": a per-row logit threshold for the fused sampling
kernel.

The kernel (``csrc_triton/sample.py``) and its reference (``reference.sample_logprobs``) already
take a per-row ``threshold``: tokens with ``z < threshold`` are excluded from the draw and from the
proposal normaliser (that is how top-k works). Top-p is the same mask with another threshold, so the
kernel is unchanged; this module computes the threshold (torch, on every backend, like
``reference.topk_threshold``) and ``engine/runner.py`` passes it in.

Rule (HF's TopPLogitsWarper / vLLM's, at the sampling temperature, after top-k): sort the kept
tokens by probability under softmax(z / tau), keep the smallest prefix whose mass reaches ``top_p``
(a token is kept when the mass of the tokens ranked before it is < top_p; the most likely token
always is). The threshold is the logit of the last kept token; tokens tied with it are all kept, as
for top-k. Masses are accumulated in fp64.
"""
from __future__ import annotations

from typing import Optional

import torch


def topp_threshold(logits: torch.Tensor, inv_tau: float, top_p: Optional[float],
                   threshold: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Per-row threshold [R] fp32 combining `threshold` (top-k's, or None) with the nucleus of
    softmax(z * inv_tau) over the tokens that threshold keeps. None when there is nothing to cut."""
    if top_p is None or top_p >= 1.0:
        return threshold
    z = logits.float()
    if threshold is not None:
        z = z.masked_fill(z < threshold[:, None], float("-inf"))
    zs, _ = torch.sort(z, dim=-1, descending=True)  # [R, V]
    p = torch.softmax(zs.double() * inv_tau, dim=-1)
    before = torch.cumsum(p, dim=-1) - p  # mass of the tokens ranked before each one
    keep = (before < top_p).sum(dim=-1).clamp_min(1)  # the most likely token always stays
    thr = zs.gather(1, (keep - 1)[:, None])[:, 0].contiguous()
    return thr if threshold is None else torch.maximum(thr, threshold)
