"""Request state: a `Request` (one prompt, n samples) has n `Group`s (one per sample: an MH chain,
a plain sample, a set of SMC particles); a group decodes through one or more `Seq`s, each on one
decode row of the KV cache. The engine advances Seqs; a group's policy decides what they decode."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..sampling_params import SamplingParams

PHASES = ("prefill_s", "decode_s", "accept_s", "kv_copy_s")


class Phase(enum.Enum):
    WAITING = "waiting"    # group queued, no rows yet
    DECODING = "decoding"  # seq samples one token per engine step
    HELD = "held"          # seq keeps its row but does not decode (e.g. an ended SMC particle)
    DONE = "done"


@dataclass(eq=False)
class Seq:
    """One decode row's sampling segment: tokens `tokens` (the generated sequence being built, its
    kept prefix included) grow until EOS or `limit`; `feed` is the token fed at the next step
    (the last token of a state is fed lazily, so each sampled token costs one model position)."""

    group: "Group"
    seed: int                       # token noise: key = reference.row_key_int(seed, draws)
    row: int = -1
    phase: Phase = Phase.WAITING
    tokens: List[int] = field(default_factory=list)
    limit: int = 0
    feed: int = 0
    buf: int = 0                    # KVManager token buffer (0 current, 1 proposal) this segment writes
    draws: int = 0                  # tokens sampled by this seq so far (its noise counter)
    last_lp: float = 0.0            # log p / log q of the token sampled this step
    last_lq: float = 0.0
    last_h: float = 0.0             # entropy of the base conditional it was sampled from (0.0 unless computed)
    tau: Optional[float] = None     # sampling temperature override (SPS rollouts sample from p: 1.0)
    topn: bool = True               # its tokens get the top-N log-prob pass when the request asks (sps: no)
    stop_context: List[int] = field(default_factory=list)  # kept tokens before `tokens` (sps rollouts)
    watch: Any = None               # stop_strings.StopWatch of this segment (made at its first token)
    stopped: bool = False           # the segment ended at a stop string (params.stop)

    def start(self, tokens: List[int], limit: int, feed: int, buf: int = 0):
        self.tokens, self.limit, self.feed, self.buf = tokens, limit, feed, buf
        self.phase = Phase.DECODING
        self.watch, self.stopped = None, False

    def append(self, tok: int, lp: float, lq: float, eos, h: float = 0.0) -> bool:
        """Record a sampled token; True if the segment ended (EOS or its limit)."""
        self.tokens.append(tok)
        self.draws += 1
        self.last_lp, self.last_lq, self.last_h = lp, lq, h
        self.group.sampled += 1
        self.group.positions += 1
        ended = tok in eos or len(self.tokens) >= self.limit
        if not ended:
            self.feed = tok
        return ended


@dataclass(eq=False)
class Group:
    """One sample of a request: the unit a policy works on and the scheduler admits."""

    request: "Request"
    index: int                      # sample index within the request
    seed: int
    seqs: List[Seq] = field(default_factory=list)
    store_rows: List[int] = field(default_factory=list)
    state: Any = None               # the policy's own state
    sampled: int = 0                # tokens sampled (all seqs)
    positions: int = 0              # model positions computed (prefill + decode)
    prefilled: int = 0
    t0: float = 0.0
    phase_s: Dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    done: bool = False

    @property
    def prompt(self) -> List[int]:
        return self.request.prompt

    @property
    def params(self) -> SamplingParams:
        return self.request.params


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: List[int]
    params: SamplingParams
    prompt_index: int = 0
    stream: bool = False
    groups: List[Group] = field(default_factory=list)
    results: List[Optional[Any]] = field(default_factory=list)  # SampleResult per group, when done
    error: Optional[Exception] = None
    arrival: float = field(default_factory=time.perf_counter)
    prompt_scores: Optional[list] = None  # params.prompt_logprobs: [None, entry of token 1, ...] (logprob_rows)

    @property
    def finished(self) -> bool:
        return all(r is not None for r in self.results)

    @property
    def prompt_key(self) -> tuple:
        return tuple(self.prompt)
