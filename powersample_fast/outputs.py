"""What sampling returns: `SampleResult` (one sample; the fast sampler and the naive baseline) and
`RequestOutput` (what `Engine.step` returns per request: finished results or streamed tokens)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class SampleResult:
    """One power sample (one MCMC chain).

    token_ids: generated tokens only (the prompt excluded); logp/logq: per generated token, the
    base model log-prob (temperature 1) and the proposal log-prob. ``accepted``/``proposed``
    count MH proposals of this chain. ``method``: the policy that produced it ("mh", "plain", ...). ``stats``: tokens_sampled (what the algorithm sampled),
    tokens_decoded (model positions computed in decode steps), tokens_prefilled (positions computed
    by prefill, i.e. re-computation of a prefix in the naive baseline), and seconds per phase.
    """

    prompt_index: int
    sample_index: int
    text: str
    token_ids: List[int]
    logp: List[float]
    logq: List[float]
    accepted: int
    proposed: int
    finished_by_eos: bool
    stats: Dict[str, float] = field(default_factory=dict)
    method: str = "mh"
    extra: Dict[str, Any] = field(default_factory=dict)  # the method's own outputs (and "error" if it failed)
    # with SamplingParams.logprobs = N: per token, its log p from the top-N pass (bit-consistent with
    # the top values; equal to `logp` up to fp32 rounding) and the N most likely [(token id, log p)]
    token_logprobs: Optional[List[float]] = None
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None
    finished_by_stop: bool = False  # ended at one of SamplingParams.stop
    # with SamplingParams.prompt_logprobs = N: the prompt's [None, (log p, top-N) of token 1, ...]
    # (RequestOutput.prompt_logprobs; one list shared by the prompt's samples)
    prompt_logprobs: Optional[list] = None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("token_logprobs", "top_logprobs", "prompt_logprobs"):
            if d[k] is None:
                del d[k]
        d["acceptance_rate"] = self.acceptance_rate
        return d


@dataclass
class RequestOutput:
    request_id: str
    finished: bool
    results: List[SampleResult] = field(default_factory=list)  # when finished: n, in sample order
    new_tokens: Dict[int, List[int]] = field(default_factory=dict)  # stream=True, plain: this step's tokens
    error: Optional[Exception] = None
    # params.logprobs, stream=True, plain: this step's tokens' (log p, [(id, log p)]) (logprob_rows.Entry)
    new_logprobs: Dict[int, list] = field(default_factory=dict)
    prompt_logprobs: Optional[list] = None  # params.prompt_logprobs: [None, entry of prompt token 1, ...]
