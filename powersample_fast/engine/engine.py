"""The engine: add_request / step / abort over one running decode batch (vLLM's shape).

`step()` is schedule -> prefill -> start -> decode -> postprocess -> compact: the scheduler plans
which queued groups enter free rows, the model runner runs their prefills, their policies start
them, the runner decodes every active row one position and samples, each sampled token is appended
to its seq and the policies take their decisions on the seqs that ended. Requests added between
steps join the running batch; requests of different methods share it.
"""
from __future__ import annotations

import itertools
import math
import time
from typing import Dict, List, Optional

from ..device import resolve_max_batch
from ..errors import ConfigError, NonFiniteLogitsError
from ..models.tokenizer import eos_set
from ..outputs import RequestOutput, SampleResult
from ..prompts import normalize_prompts
from ..sampling_params import SamplingParams, chain_seed, resolve_seed
from .context import EngineContext
from . import stop_strings
from .kv_manager import KVManager, fit_rows
from .outputs import step_outputs, stream_token
from .policies import get_policy
from .runner import ModelRunner
from .scheduler import Scheduler, check_request
from .sequence import PHASES, Group, Request, Seq


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
        self.eos = eos_set(model.config.eos_token_ids, eos_token_ids)
        self.max_len = int(max_len or model.config.max_seq_len)
        mb = resolve_max_batch(max_batch, self.device)
        per = 1 if store_rows is None else store_rows / mb
        n_dec = fit_rows(model, mb, self.max_len, per)
        n_sto = n_dec if store_rows is None else min(store_rows, n_dec)
        self.kv = KVManager(model.config, n_dec, n_sto, self.max_len, self.max_len, self.device, model.dtype)
        self.runner = ModelRunner(model, self.kv, cuda_graphs)
        self.scheduler = Scheduler(self.kv)
        self.compact = compact
        self.requests: Dict[str, Request] = {}
        self._done: List[RequestOutput] = []
        self._ids = itertools.count()
        self.times = dict.fromkeys(PHASES, 0.0)
        # row_steps: rows computed, summed over decode steps; row_steps_skipped: rows in use (held) above
        # a step's highest decoding row, which the step did not compute
        self.stats = {"decode_steps": 0, "max_batch_rows": 0, "tokens_sampled": 0, "row_steps": 0,
                      "row_steps_skipped": 0}
        self.ctx = EngineContext(self.kv, self.runner, tokenizer, self.eos, self.times, self._finish_group)

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
        check_request(self.model.config, self.max_len, self.kv, ids, p, index, self.tokenizer)

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
        plan = self.scheduler.schedule()
        for p in plan.prefills:
            t = time.perf_counter()
            if p.score is None:
                self.runner.prefill(p.row, p.tokens, p.kv_mark)
            else:  # params.prompt_logprobs: every position's logits kept
                p.group.request.prompt_scores = self.runner.prefill_scored(p.row, p.group.prompt, p.score, p.kv_mark)
            self.ctx.charge("prefill_s", t, [p.group])
        for g in plan.admitted:
            get_policy(g.params.method).start(self.ctx, g)
        seqs = self.scheduler.decoding()
        stream: Dict[str, RequestOutput] = {}
        if seqs:
            out = self.runner.decode(seqs, self.ctx.charge)
            self.stats["decode_steps"] += 1
            self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(seqs))
            self.stats["tokens_sampled"] += len(seqs)
            self.stats["row_steps"] += self.runner.last_rows
            self.stats["row_steps_skipped"] += max(0, self.kv.n_active_rows() - self.runner.last_rows)
            self._postprocess(seqs, out, stream)
            if not self.scheduler.waiting and self.compact:
                self.scheduler.compact()
        done, self._done = self._done, []
        return step_outputs(done, stream, self.requests)

    # ------------------------------------------------------------------ internals
    def _postprocess(self, seqs, out, stream):
        by_pol: Dict[str, tuple] = {}
        for s, (tok, lp, lq, h) in zip(seqs, out):
            g = s.group
            if g.done:
                continue
            if not (math.isfinite(lp) and math.isfinite(lq)):
                self._fail(g, NonFiniteLogitsError(
                    f"non-finite logits (NaN/Inf) while sampling chain (prompt {g.request.prompt_index}, sample {g.index}) "
                    f"at generated position {len(s.tokens)}; check the model weights and dtype"))
                continue
            ended = s.append(tok, lp, lq, self.eos, h)
            # a stop string ends the segment as EOS does (ALGORITHM.md "Stop strings"), also at its limit
            stopped = bool(g.params.stop) and tok not in self.eos and stop_strings.check(self.tokenizer, s)
            stepped, ends = by_pol.setdefault(g.params.method, ([], []))
            stepped.append(s)
            if ended or stopped:
                ends.append(s)
            if g.request.stream and g.params.method == "plain":  # samplers stream nothing until final
                stream_token(stream, s, tok, self.runner.logprobs)
        for method, (stepped, ends) in by_pol.items():
            pol = get_policy(method)
            pol.on_step(self.ctx, [s for s in stepped if not s.group.done])
            ends = [s for s in ends if not s.group.done]
            if ends:
                pol.on_ended(self.ctx, ends)

    def _finish_group(self, g: Group, result: SampleResult):
        """A policy's group is done: record its result and free its rows."""
        g.done = True
        self.scheduler.release(g)
        req = g.request
        req.results[g.index] = result
        if req.finished and self.requests.pop(req.request_id, None) is not None:
            self._done.append(RequestOutput(req.request_id, True, list(req.results), error=req.error,
                                            prompt_logprobs=req.prompt_scores))

    def _fail(self, g: Group, err: Exception):
        g.request.error = g.request.error or err
        s = g.seqs[0]
        self.ctx.finish(g, s.tokens, s.row, s.buf, extra={"error": str(err)})
