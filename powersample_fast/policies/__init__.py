"""Sampling policies: what the engine decodes for a request, and what happens when a row ends.

A policy is one object per method (stateless across groups: a group's state lives in
`group.state`). The engine calls, for each group of a request of that method:
  - `rows(params) -> (decode_rows, store_rows)`: rows the scheduler allocates per group;
  - `start(engine, group)`: its rows hold the prompt's K/V [0, P-1); start the first segment;
  - `on_step(engine, seqs)`: every seq of this policy that sampled a token this step (optional);
  - `on_ended(engine, seqs)`: the seqs whose segment ended this step (EOS or limit), batched, so
    decisions run as one launch (MH: one `mh_accept_` per step);
  - `planned_tokens(params)`: expected tokens sampled per group (progress bars, ETAs).
A policy finishes a group with `engine.finish_group(group, result)`. Methods: plain, mh (Algorithm 1),
smc (Power-SMC: N particles, resampling by fork), sps (Scalable Power Sampling: rollouts per candidate).
"""
from .mh import MHPolicy
from .plain import PlainPolicy
from .smc import SMCPolicy
from .sps import SPSPolicy

POLICIES = {"plain": PlainPolicy(), "mh": MHPolicy(), "smc": SMCPolicy(), "sps": SPSPolicy()}


def get_policy(method: str):
    return POLICIES[method]
