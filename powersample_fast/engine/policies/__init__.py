"""Sampling policies: what the engine decodes for a request, and what happens when a row ends.

A policy is one object per method (`base.Policy`; stateless across groups: a group's state lives in
`group.state`). The engine calls, for each group of a request of that method:
  - `rows(params) -> (decode_rows, store_rows)`: rows the scheduler allocates per group;
  - `start(eng, group)`: its rows hold the prompt's K/V [0, P-1); start the first segment;
  - `on_step(eng, seqs)`: every seq of this policy that sampled a token this step;
  - `on_ended(eng, seqs)`: the seqs whose segment ended this step (EOS, a stop string or the
    limit), batched, so decisions run as one launch (MH: one `mh_accept_` per step);
  - `planned_tokens(params)`: expected tokens sampled per group (progress bars, ETAs).

What a policy may touch (`eng`, an `engine.context.EngineContext`; never the engine itself):
  - `eng.kv`: the KV manager, for the group's own rows only: `fork`, `copy_range`, `truncate`,
    `restore`, `copy_buffers`, `commit_extra` (an MH accept of the log-prob buffers),
    `take_proposal` (a multiple-try MH accept: a try's buffers into the work row), `lengths` (read),
    the token buffers `tok/lp/lq/h` [2, n_decode, T] (h: the entropy of each token's base
    conditional, written only by steps where a seq needs it: MH with index="entropy");
  - `eng.eos` (the EOS ids, a frozenset), `eng.device`, `eng.last_logits` ([B, V], this step's);
  - `eng.charge(phase, t_start, groups)`: time a decision (e.g. "accept_s");
  - `eng.stop_completes(stops, prefix, token)`: whether a token picked on the host completes a
    stop string (params.stop; the engine checks the sampled ones itself and sets `Seq.stopped`);
  - `eng.step_logprobs(seq)`: this step's (log p, top-N) entry of a seq whose request asked for
    log-probs (params.logprobs) and whose `Seq.topn` is set;
  - `eng.finish(group, tokens, row, buf=0, accepted=0, proposed=0, extra=None, stopped=False,
    logprobs=None)`: the group is done (its result goes to its request, its rows are freed);
    stopped: it ended at a stop string; logprobs: host (log p, top-N) entries of its tokens when
    the policy picked them on the host (else the request's asked-for log-probs are read from the
    buffers of (buf, row)).
The seqs themselves (`Seq.start`, `Seq.phase`, `Seq.tau`, `Seq.topn`, `Seq.stop_context`) are the
policy's to drive. A segment that ends at a stop string (`Seq.stopped`) ends as at EOS (ALGORITHM.md
"Stop strings").

Methods: plain, mh (Algorithm 1; its mixing options, issue 22: mh_chain.py holds a chain's state and
host mirrors, mh_mixing.py the entropy-cut and multiple-try arithmetic, mh_tries.py the multiple-try
rows), smc (Power-SMC: N particles, resampling by fork), sps (Scalable Power Sampling, block level:
L candidate blocks, rollouts for the best K), sps_token (its token-level variant: rollouts per
candidate token).
"""
from .base import Policy
from .mh import MHPolicy
from .plain import PlainPolicy
from .smc import SMCPolicy
from .sps_token import SPSPolicy
from .sps_block import BlockSPSPolicy

POLICIES = {"plain": PlainPolicy(), "mh": MHPolicy(), "smc": SMCPolicy(), "sps": BlockSPSPolicy(),
            "sps_token": SPSPolicy()}


def get_policy(method: str) -> Policy:
    return POLICIES[method]
