"""`plain`: ancestral sampling from softmax(top-k(z) / temperature), one row per sample. The
engine's own baseline: what "tokens/s vs plain decoding" is measured against. A stop string
(params.stop) ends a sample like EOS and frees its row (the engine checks it as tokens arrive)."""
from __future__ import annotations

from ...sampling_params import SamplingParams
from .base import Policy


class PlainPolicy(Policy):
    name = "plain"

    def rows(self, params: SamplingParams):
        return 1, 0

    def planned_tokens(self, params: SamplingParams) -> float:
        return float(params.max_new_tokens)

    def start(self, eng, group):
        seq = group.seqs[0]
        seq.start([], group.params.max_new_tokens, group.prompt[-1], buf=0)

    def on_ended(self, eng, seqs):
        for s in seqs:
            g = s.group
            eng.finish(g, s.tokens, s.row, buf=0, stopped=s.stopped)

