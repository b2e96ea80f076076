"""What the engine hands back: a finished group's `SampleResult`, built from its tokens, the
log-probs in the KV manager's token buffers (and the returned log-probs a request asked for), and
the group's accounting (tokens sampled / prefilled, positions, time per phase); and the streamed
tokens of a step (`stream_token`, `step_outputs`)."""
from __future__ import annotations

import time
from typing import Dict, List, Optional

from ..outputs import RequestOutput, SampleResult
from .kv_manager import KVManager
from .logprob_rows import LogprobRows, Logprobs
from .sequence import Group, Seq


def build_result(kv: KVManager, tokenizer, eos, g: Group, tokens: List[int], row: int, buf: int = 0,
                 accepted: int = 0, proposed: int = 0, extra: Optional[dict] = None, stopped: bool = False,
                 logprobs: Optional[Logprobs] = None) -> SampleResult:
    """A SampleResult of `tokens`, whose log-probs are in the token buffers (buf, row, :len);
    `logprobs`: the (own, top-N) log-probs params.logprobs asked for."""
    t = len(tokens)
    lp = kv.lp[buf, row, :t].tolist() if row >= 0 else []
    lq = kv.lq[buf, row, :t].tolist() if row >= 0 else []
    own, top = logprobs if logprobs is not None else (None, None)
    return SampleResult(
        prompt_index=g.request.prompt_index, sample_index=g.index,
        text=tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else "",
        token_ids=list(tokens), logp=lp, logq=lq, accepted=accepted, proposed=proposed,
        finished_by_eos=bool(tokens) and tokens[-1] in eos,
        stats={"tokens_sampled": g.sampled, "tokens_decoded": g.sampled, "tokens_prefilled": g.prefilled,
               "positions_computed": g.positions, "prompt_tokens": len(g.prompt),
               "wall_s": time.perf_counter() - g.t0, **g.phase_s},
        method=g.params.method, extra=dict(extra or {}), token_logprobs=own, top_logprobs=top,
        finished_by_stop=stopped, prompt_logprobs=g.request.prompt_scores,
    )


def stream_token(stream: Dict[str, RequestOutput], s: Seq, tok: int, logprobs: LogprobRows):
    """A streamed (plain) request's token of this step, and its log-probs entry if params.logprobs."""
    g, req = s.group, s.group.request
    o = stream.setdefault(req.request_id, RequestOutput(req.request_id, False, prompt_logprobs=req.prompt_scores))
    o.new_tokens.setdefault(g.index, []).append(tok)
    if g.params.logprobs is not None:
        o.new_logprobs.setdefault(g.index, []).append(logprobs.step_entry(s))


def step_outputs(done: List[RequestOutput], stream: Dict[str, RequestOutput], running) -> List[RequestOutput]:
    """What `Engine.step` returns: the requests that finished (carrying their last streamed tokens
    too), then the stream updates of the requests still `running`."""
    for o in done:
        if o.request_id in stream:
            last = stream.pop(o.request_id)
            o.new_tokens, o.new_logprobs = last.new_tokens, last.new_logprobs
    return done + [o for o in stream.values() if o.request_id in running]
