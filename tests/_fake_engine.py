"""TEMPORARY stand-in for `powersample_fast.engine` (being written on main), so the server, the batch
runner and the data-parallel code can be built and tested first. Delete once the real engine lands.

`install()` registers this module as `powersample_fast.engine` and swaps in a `SamplingParams` with
the contract's extra fields (`method`, `early_stop`). Each request is sampled whole by today's
`PowerSampler.generate` when admitted; its results are then released one "decode step" per sampled
token (plain streams one token per step), so requests overlap in time the way they do in the engine
and aborts / batching can be observed.
"""
from __future__ import annotations

import itertools
import time
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from powersample_fast import params as _params
from powersample_fast.errors import ConfigError, PowerSampleError

_Base = _params.SamplingParams
METHODS = ("plain", "mh")


@dataclass(frozen=True)
class SamplingParams(_Base):
    method: str = "mh"
    early_stop: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        super().__post_init__()


@dataclass
class RequestOutput:
    request_id: str
    finished: bool
    results: list = field(default_factory=list)
    new_tokens: Dict[int, List[int]] = field(default_factory=dict)
    error: Optional[Exception] = None


@dataclass
class _Req:
    rid: str
    prompt: List[int]
    params: SamplingParams
    stream: bool
    prompt_index: int
    results: list = None
    error: Exception = None
    tick: int = 0
    length: int = 0


class Engine:
    def __init__(self, model, tokenizer, max_batch=None, cuda_graphs=False):
        from powersample_fast.sampler import PowerSampler

        self.model, self.tokenizer = model, tokenizer
        self.max_batch = max_batch or 8
        self._sampler = PowerSampler(model, tokenizer)
        self._ids = itertools.count()
        self.waiting: List[_Req] = []
        self.running: List[_Req] = []
        self.stats = {"decode_steps": 0, "max_batch_rows": 0}

    @property
    def num_waiting(self):
        return len(self.waiting)

    @property
    def num_running(self):
        return len(self.running)

    def has_unfinished(self):
        return bool(self.waiting or self.running)

    def add_request(self, prompt, params, request_id=None, stream=False, prompt_index=0):
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"params must be a SamplingParams (got {type(params).__name__})")
        ids = _params.normalize_prompts([prompt] if isinstance(prompt, str) else prompt, self.tokenizer)[0]
        V, ctx = self.model.config.vocab_size, self.model.config.max_seq_len
        bad = [x for x in ids if not 0 <= x < V]
        if bad:
            raise ConfigError(f"prompt 0 has token id(s) outside the vocabulary [0, {V}): {bad[:5]}")
        if len(ids) + params.max_new_tokens > ctx:
            raise ConfigError(f"prompt 0 has {len(ids)} tokens; with max_new_tokens={params.max_new_tokens} that "
                              f"exceeds the model's context of {ctx} tokens; shorten the prompt or lower max_new_tokens")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        self.waiting.append(_Req(rid, ids, params, stream, prompt_index))
        return rid

    def abort(self, rid):
        for q in (self.waiting, self.running):
            for r in q:
                if r.rid == rid:
                    q.remove(r)
                    return True
        return False

    def _sample(self, r: _Req):
        p = r.params
        base = _params.chain_seed(_params.resolve_seed(p.seed), r.prompt_index, 0)
        kw = dict(max_new_tokens=p.max_new_tokens, n=p.n, seed=base, top_k=p.top_k, progress=False)
        if p.method == "plain":
            kw.update(alpha=1.0, mcmc_steps=0, block_size=p.max_new_tokens,
                      proposal_temperature=p.proposal_temperature or 1.0)
        else:
            kw.update(alpha=p.alpha, mcmc_steps=p.mcmc_steps, block_size=p.block_size,
                      proposal_temperature=p.proposal_temperature, index=p.index)
        try:
            r.results = self._sampler.generate([r.prompt], **kw)
            key = (lambda x: len(x.token_ids)) if p.method == "plain" else (lambda x: x.stats["tokens_sampled"])
            r.length = max(key(x) for x in r.results)
        except PowerSampleError as e:
            r.error = e

    def step(self):
        rows = sum(r.params.n for r in self.running)
        while self.waiting and (not self.running or rows + self.waiting[0].params.n <= self.max_batch):
            r = self.waiting.pop(0)
            self._sample(r)
            self.running.append(r)
            rows += r.params.n
        time.sleep(0.001)  # a decode step's duration, so that requests overlap as in the engine
        self.stats["decode_steps"] += 1
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], rows)
        outs = []
        for r in list(self.running):
            r.tick += 1
            new = {}
            if r.stream and r.params.method == "plain" and r.results:
                new = {i: x.token_ids[r.tick - 1:r.tick] for i, x in enumerate(r.results) if r.tick <= len(x.token_ids)}
            done = r.error is not None or r.tick >= r.length
            if done:
                self.running.remove(r)
            outs.append(RequestOutput(r.rid, done, r.results if done and r.error is None else [], new, r.error))
        return outs


def install():
    """Make `powersample_fast.engine` and the extended `SamplingParams` importable (before importing
    the server / batch modules)."""
    _params.SamplingParams = SamplingParams
    sys.modules["powersample_fast.engine"] = sys.modules[__name__]
    import powersample_fast

    powersample_fast.engine = sys.modules[__name__]


