"""`plain`: ancestral sampling from softmax(top-k(z) / temperature), one row per sample. The
engine's own baseline: what "tokens/s vs plain decoding" is measured against."""
from __future__ import annotations

from ..params import SamplingParams


class PlainPolicy:
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
            eng.finish_group(g, eng.make_result(g, s.tokens, s.row, buf=0))

