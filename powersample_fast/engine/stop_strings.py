"""Stop strings (`SamplingParams.stop`) checked as tokens are sampled, on the decoded tail.

A segment (a plain sample, an MH extension or proposal, an SMC particle, an SPS rollout) ends at
the token after which the text of its generated tokens contains a stop string (ALGORITHM.md
"Stop strings"): `plain` frees its row there; the samplers treat the segment as ended by EOS.

`StopWatch` decodes incrementally (vLLM's prefix/read offsets): each token adds the characters it
completes (none while a UTF-8 sequence is incomplete) and only the last (longest stop - 1)
characters are kept, so a stop string spelled across token boundaries is found and each token
costs two decodes of a few tokens, whatever the length of the text. The text is the one the
results carry: `tokenizer.decode(tokens, skip_special_tokens=True)`.
"""
from __future__ import annotations

from typing import List, Sequence

CONTEXT = 5  # tokens decoded before the first unread one (merges, leading spaces), as vLLM


class StopWatch:
    def __init__(self, tokenizer, stops: Sequence[str], prefix: Sequence[int] = ()):
        """prefix: the generated tokens before the first one pushed (a kept prefix: MH proposals,
        SMC copies, SPS rollouts); only its tail is decoded."""
        self.tok, self.stops = tokenizer, tuple(stops)
        self.keep = max(len(s) for s in self.stops) - 1
        window = list(prefix[-(4 * self.keep + 8 + CONTEXT):])
        self.ids = window
        self.prefix_offset, self.read_offset = max(0, len(window) - CONTEXT), len(window)
        text = self._decode(window) if window else ""
        self.tail = text[-self.keep:] if self.keep else ""

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> bool:
        """Add one token; True if the text now contains a stop string."""
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        now = self._decode(self.ids[self.prefix_offset:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return False  # no complete new character yet
        window = self.tail + now[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.prefix_offset > 64:  # forget what will never be decoded again
            del self.ids[:self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        self.tail = window[-self.keep:] if self.keep else ""
        return any(s in window for s in self.stops)


def check(tokenizer, seq) -> bool:
    """The engine's check of `seq` after it appended a token (params.stop non-empty): True (and
    seq.stopped) if its segment's text now holds a stop string."""
    if seq.watch is None:
        seq.watch = StopWatch(tokenizer, seq.group.params.stop, seq.stop_context + seq.tokens[:-1])
    if seq.watch.push(seq.tokens[-1]):
        seq.stopped = True
    return seq.stopped


def completes(tokenizer, stops: Sequence[str], prefix: List[int], token: int) -> bool:
    """Whether appending `token` to the generated tokens `prefix` completes a stop string (the
    prefix holds none): for policies that pick tokens on the host (sps candidates)."""
    return StopWatch(tokenizer, stops, prefix).push(token)
