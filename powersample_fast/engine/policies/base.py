"""`Policy`: the interface every sampling method implements (see __init__.py for what it may touch)."""
from __future__ import annotations

from typing import List, Tuple

from ...sampling_params import SamplingParams
from ..sequence import Group, Seq


class Policy:
    """One object per method, stateless across groups (a group's state lives in `group.state`).
    `eng` is the engine's `EngineContext` (engine/context.py), never the engine itself."""

    name = ""

    def rows(self, params: SamplingParams) -> Tuple[int, int]:
        """(decode rows, store rows) the scheduler allocates per group (all or nothing)."""
        raise NotImplementedError

    def planned_tokens(self, params: SamplingParams) -> float:
        """Expected tokens sampled per group (progress bars, ETAs)."""
        raise NotImplementedError

    def start(self, eng, group: Group) -> None:
        """The group's rows hold the prompt's K/V [0, P-1): start its first segment (`Seq.start`)."""
        raise NotImplementedError

    def on_step(self, eng, seqs: List[Seq]) -> None:
        """Every seq of this policy that sampled a token this step (called before `on_ended`)."""

    def on_ended(self, eng, seqs: List[Seq]) -> None:
        """The seqs whose segment ended this step (EOS, a stop string or the limit), batched so
        decisions run as one launch (MH: one `mh_accept_` per step)."""
        raise NotImplementedError
