"""The engine: add_request / step / abort over one running decode batch (vLLM's shape).

`step()` is admit -> decode -> policy decisions -> compact: the scheduler admits queued groups into
free rows, the model runner decodes every active row one position and samples, each sampled token
is appended to its seq, and the policies take their decisions on the seqs that ended. Requests
added between steps join the running batch; requests of different methods share it.
"""
from __future__ import annotations

import itertools
import math
import time
from typing import Dict, List, Optional

from ..errors import ConfigError, NonFiniteLogitsError
from ..kv_cache import KVManager
from ..params import SamplingParams, chain_seed, normalize_prompts, resolve_seed
from ..policies import get_policy
from ..types import SampleResult
from .outputs import RequestOutput, build_result, check_request
from .runner import ModelRunner
from .scheduler import Scheduler, fit_rows
from .sequence import PHASES, Group, Phase, Request, Seq


class Engine:
    """One model, one KV cache, one decode batch of up to `max_batch` decode rows.

    max_len: positions per row (prompt + new tokens), default the model's context. store_rows:
    backup rows (MH needs one per chain; default one per decode row). Not thread-safe: drive it
    from one thread."""

    def __init__(self, model, tokenizer=None, *, eos_token_ids=None, max_batch: Optional[int] = None,
                 max_len: Optional[int] = None, store_rows: Optional[int] = None, cuda_graphs: bool = False,
                 compact: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.device = model.device
        ids = eos_token_ids if eos_token_ids is not None else model.config.eos_token_ids
        self.eos = frozenset(int(e) for e in ids)
        self.max_len = int(max_len or model.config.max_seq_len)
        mb = max_batch if max_batch is not None else (64 if self.device.type == "cuda" else 8)
        if not isinstance(mb, int) or isinstance(mb, bool) or mb < 1:
            raise ConfigError(f"max_batch must be an integer >= 1 (got {mb!r})")
        per = 1 if store_rows is None else store_rows / mb
        n_dec = fit_rows(model, mb, self.max_len, per)
        n_sto = n_dec if store_rows is None else min(store_rows, n_dec)
        self.kv = KVManager(model.config, n_dec, n_sto, self.max_len, self.max_len, self.device, model.dtype)
        self.runner = ModelRunner(model, self.kv, cuda_graphs)
        self.scheduler = Scheduler(self)
        self.compact = compact
        self.requests: Dict[str, Request] = {}
        self._done: List[RequestOutput] = []
        self._ids = itertools.count()
        self.times = dict.fromkeys(PHASES, 0.0)
        self.stats = {"decode_steps": 0, "max_batch_rows": 0, "tokens_sampled": 0}

    # ------------------------------------------------------------------ public API
    def add_request(self, prompt, params: SamplingParams, request_id: Optional[str] = None, stream: bool = False,
                    prompt_index: int = 0) -> str:
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"params must be a SamplingParams (got {type(params).__name__})")
        ids = normalize_prompts([prompt] if isinstance(prompt, str) else prompt, self.tokenizer, chat=False)
        if len(ids) != 1:
            raise ConfigError(f"add_request takes one prompt (got {len(ids)}); call it once per prompt")
        self.check_prompt(ids[0], params, prompt_index)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ConfigError(f"request id {rid!r} is already running; ids must be unique")
        req = Request(rid, ids[0], params, prompt_index, stream)
        base = resolve_seed(params.seed)
        n_seq = get_policy(params.method).rows(params)[0]
        for si in range(params.n):
            g = Group(req, si, chain_seed(base, prompt_index, si))
            g.seqs = [Seq(g, g.seed if j == 0 else chain_seed(g.seed, -1, j)) for j in range(n_seq)]
            req.groups.append(g)
            req.results.append(None)
            self.scheduler.add(g)
        self.requests[rid] = req
        return rid

    def check_prompt(self, ids: List[int], p: SamplingParams, index: int = 0):
        """ConfigError if prompt `index` (token ids) cannot run with `p` on this engine."""
        check_request(self.model.config, self.max_len, self.kv, ids, p, index)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its rows at once. False if unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.remove(req)
        for g in req.groups:
            g.done = True
            self.scheduler.release(g)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._done)

    @property
    def num_waiting(self) -> int:
        return len({g.request.request_id for g in self.scheduler.waiting})

    @property
    def num_running(self) -> int:
        return len(self.requests) - self.num_waiting

    def step(self) -> List[RequestOutput]:
        """Admit, decode one position for every active row, let the policies decide. Returns the
        requests that finished (and stream updates)."""
        self.scheduler.admit()
        seqs = [s for s in self.scheduler.row_seq.values() if s.phase is Phase.DECODING]
        stream: Dict[str, RequestOutput] = {}
        if seqs:
            seqs.sort(key=lambda s: s.row)
            out = self.runner.decode(seqs, self.charge)
            self.stats["decode_steps"] += 1
            self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(seqs))
            self.stats["tokens_sampled"] += len(seqs)
            self._postprocess(seqs, out, stream)
            if not self.scheduler.waiting and self.compact:
                self.scheduler.compact()
        done, self._done = self._done, []
        for o in done:  # a request that finished this step carries its last streamed tokens too
            if o.request_id in stream:
                o.new_tokens = stream.pop(o.request_id).new_tokens
        return done + [o for o in stream.values() if o.request_id in self.requests]

    # ------------------------------------------------------------------ internals
    def _postprocess(self, seqs, out, stream):
        by_pol: Dict[str, tuple] = {}
        for s, (tok, lp, lq) in zip(seqs, out):
            g = s.group
            if g.done:
                continue
            if not (math.isfinite(lp) and math.isfinite(lq)):
                self._fail(g, NonFiniteLogitsError(
                    f"non-finite logits (NaN/Inf) while sampling chain (prompt {g.request.prompt_index}, sample {g.index}) "
                    f"at generated position {len(s.tokens)}; check the model weights and dtype (float16 overflow?)"))
                continue
            ended = s.append(tok, lp, lq, self.eos)
            stepped, ends = by_pol.setdefault(g.params.method, ([], []))
            stepped.append(s)
            if ended:
                ends.append(s)
            if g.request.stream and g.params.method == "plain":  # samplers stream nothing until final
                o = stream.setdefault(g.request.request_id, RequestOutput(g.request.request_id, False))
                o.new_tokens.setdefault(g.index, []).append(tok)
        for method, (stepped, ends) in by_pol.items():
            pol = get_policy(method)
            if hasattr(pol, "on_step"):
                pol.on_step(self, [s for s in stepped if not s.group.done])
            ends = [s for s in ends if not s.group.done]
            if ends:
                pol.on_ended(self, ends)

    def charge(self, phase: str, t_start: float, groups):
        """Add the time since t_start to `phase`, and an equal share of it to each group served."""
        dt = time.perf_counter() - t_start
        self.times[phase] += dt
        for g in groups:
            g.phase_s[phase] += dt / len(groups)

    def make_result(self, g: Group, tokens: List[int], row: int, buf: int = 0, **kw) -> SampleResult:
        """A SampleResult of `tokens`, whose log-probs are in the token buffers (buf, row, :len)."""
        return build_result(self, g, tokens, row, buf, **kw)

    def finish_group(self, g: Group, result: SampleResult):
        """A policy's group is done: record its result and free its rows."""
        g.done = True
        self.scheduler.release(g)
        req = g.request
        req.results[g.index] = result
        if req.finished and self.requests.pop(req.request_id, None) is not None:
            self._done.append(RequestOutput(req.request_id, True, list(req.results), error=req.error))

    def _fail(self, g: Group, err: Exception):
        s = g.seqs[0]
        res = self.make_result(g, s.tokens, s.row, s.buf, extra={"error": str(err)})
        g.request.error = g.request.error or err
        self.finish_group(g, res)
