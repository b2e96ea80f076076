"""`EngineContext`: the narrow face of the engine a sampling policy acts through (the interface is
documented in policies/__init__.py): the KV manager (rows, lengths, queued copies, token buffers),
the EOS set, the device, this step's logits, time accounting, the stop-string test of a host-picked
token, and `finish` (a group's result, with the log-probs its request asked for)."""
from __future__ import annotations

import time
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence

from ..outputs import SampleResult
from . import stop_strings
from .kv_manager import KVManager
from .logprob_rows import Entry
from .outputs import build_result
from .runner import ModelRunner
from .sequence import Group


class EngineContext:
    def __init__(self, kv: KVManager, runner: ModelRunner, tokenizer, eos: FrozenSet[int],
                 times: Dict[str, float], on_finish: Callable[[Group, SampleResult], None]):
        self.kv, self.runner, self.tokenizer, self.eos = kv, runner, tokenizer, eos
        self.device = runner.device
        self.times = times  # seconds per phase, all groups (the engine's `times`)
        self._on_finish = on_finish

    @property
    def last_logits(self):
        """[B, V] logits of this step's decode (valid until the next step)."""
        return self.runner.last_logits

    def charge(self, phase: str, t_start: float, groups: Iterable[Group]):
        """Add the time since t_start to `phase`, and an equal share of it to each group served."""
        dt = time.perf_counter() - t_start
        self.times[phase] += dt
        groups = list(groups)
        for g in groups:
            g.phase_s[phase] += dt / len(groups)

    def stop_completes(self, stops: Sequence[str], prefix: List[int], token: int) -> bool:
        """Whether appending `token` to the generated tokens `prefix` (which hold no stop string)
        completes one of `stops` (for tokens a policy picks on the host: sps candidates)."""
        return stop_strings.completes(self.tokenizer, stops, prefix, token)

    def step_logprobs(self, seq) -> Optional[Entry]:
        """`seq`'s (log p, top-N) entry of this step when its request asked for log-probs (params.logprobs;
        for a policy that assembles its result from segments on the host: sps candidates)."""
        return self.runner.logprobs.step_entry(seq)

    def finish(self, g: Group, tokens: List[int], row: int, buf: int = 0, accepted: int = 0, proposed: int = 0,
               extra: Optional[dict] = None, stopped: bool = False, logprobs: Optional[List[Entry]] = None):
        """The group is done with `tokens` (log-probs in the token buffers (buf, row, :len)): its
        result goes to its request and its rows are freed. stopped: it ended at a stop string.
        logprobs: the kept tokens' (log p, top-N) entries when the policy picked them on the host
        (else, if the request asked, they are read from the log-prob buffers of (buf, row))."""
        n = g.params.logprobs
        lps = None if n is None else self.runner.logprobs.for_result(buf, row, len(tokens), n, logprobs)
        res = build_result(self.kv, self.tokenizer, self.eos, g, tokens, row, buf, accepted, proposed, extra,
                           stopped, lps)
        self._on_finish(g, res)
