"""What the engine returns: `RequestOutput` per request and step, `SampleResult` per sample; and
the checks a request passes before it is queued."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..errors import ConfigError
from ..params import SamplingParams
from ..policies import get_policy
from ..types import SampleResult
from .sequence import Group


@dataclass
class RequestOutput:
    request_id: str
    finished: bool
    results: List[SampleResult] = field(default_factory=list)  # when finished: n, in sample order
    new_tokens: Dict[int, List[int]] = field(default_factory=dict)  # stream=True, plain: this step's tokens
    error: Optional[Exception] = None


def build_result(eng, g: Group, tokens: List[int], row: int, buf: int = 0, accepted: int = 0, proposed: int = 0,
                 extra: Optional[dict] = None) -> SampleResult:
    """A SampleResult of `tokens`, whose log-probs are in the token buffers (buf, row, :len)."""
    t = len(tokens)
    lp = eng.kv.lp[buf, row, :t].tolist() if row >= 0 else []
    lq = eng.kv.lq[buf, row, :t].tolist() if row >= 0 else []
    tok = eng.tokenizer
    return SampleResult(
        prompt_index=g.request.prompt_index, sample_index=g.index,
        text=tok.decode(tokens, skip_special_tokens=True) if tok is not None else "",
        token_ids=list(tokens), logp=lp, logq=lq, accepted=accepted, proposed=proposed,
        finished_by_eos=bool(tokens) and tokens[-1] in eng.eos,
        stats={"tokens_sampled": g.sampled, "tokens_decoded": g.sampled, "tokens_prefilled": g.prefilled,
               "positions_computed": g.positions, "prompt_tokens": len(g.prompt),
               "wall_s": time.perf_counter() - g.t0, **g.phase_s},
        method=g.params.method, extra=dict(extra or {}),
    )


def check_request(cfg, max_len: int, kv, ids: List[int], p: SamplingParams, index: int = 0):
    """ConfigError naming the problem if prompt `index` (token ids) cannot run with `p`."""
    V, ctx = cfg.vocab_size, cfg.max_seq_len
    bad = [x for x in ids if not 0 <= x < V]
    if bad:
        raise ConfigError(f"prompt {index} has token id(s) outside the vocabulary [0, {V}): {bad[:5]}")
    for limit, what in ((ctx, "the model's context"), (max_len, "the engine's max_len")):
        if len(ids) + p.max_new_tokens > limit:
            raise ConfigError(
                f"prompt {index} has {len(ids)} tokens; with max_new_tokens={p.max_new_tokens} that exceeds "
                f"{what} of {limit} tokens; shorten the prompt or lower max_new_tokens")
    n_dec, n_sto = get_policy(p.method).rows(p)
    if n_dec > kv.n_decode or n_sto > kv.n_store:
        raise ConfigError(f"method {p.method!r} needs {n_dec} decode and {n_sto} store rows per sample but the "
                          f"engine has {kv.n_decode} and {kv.n_store}; raise max_batch")
