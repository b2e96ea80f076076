"""Result types shared by the fast sampler and the naive baseline."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List


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

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["acceptance_rate"] = self.acceptance_rate
        return d
