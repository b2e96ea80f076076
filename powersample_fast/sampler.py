"""Power sampling (Karan & Du, Algorithm 1) with exact Metropolis-Hastings, KV reuse and batched chains.

Every chain owns one *slot*: a work row `b` of the KV cache (where it decodes) and a backup row
`S + b`. All slots decode together, one position each per step, and advance independently: a slot
whose extension or proposal ends runs its acceptance and starts its next proposal / block while the
others keep decoding; a finished slot is refilled from the queue of remaining chains.

KV invariant: the work row holds the current state's K/V for every position but the last token's
(the last sampled token is fed lazily, only when something is decoded after it). A proposal at cut m
backs up positions [P+m, P+t-1) into the backup row, truncates the work row to P+m-1 and re-feeds
x_{m-1} (its K/V is rewritten with the same values), which yields the logits of position m. So
every sampled token costs exactly one model position and no prefix is ever recomputed. Accept
keeps the work row as is; reject copies the backed-up range back (one `kv_copy_` launch for all
rejected slots of a step).
"""
from __future__ import annotations

import math
import random
import warnings
from collections import deque
import time
from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch.profiler import record_function

from . import ops, reference
from .device import free_memory_bytes
from .errors import ConfigError, NonFiniteLogitsError
from .model import KVCache, Transformer
from .params import SamplingParams, chain_seed, normalize_prompts, resolve_seed
from .types import SampleResult

EXTEND, PROPOSE = 0, 1
PHASES = ("prefill_s", "decode_s", "accept_s", "kv_copy_s")


@dataclass
class _Chain:
    pi: int
    si: int
    prompt: List[int]
    seed: int
    rng: random.Random
    k: int = 1  # stage
    tokens: List[int] = field(default_factory=list)  # current state x (host mirror)
    phase: int = EXTEND
    work: List[int] = field(default_factory=list)  # tokens of the sequence being sampled
    limit: int = 0  # L_k
    cut: int = 0
    steps_done: int = 0
    accepted: int = 0
    proposed: int = 0
    sampled: int = 0
    positions: int = 0  # model positions computed for this chain (prefill + decode)
    prefilled: int = 0
    t0: float = 0.0
    phase_s: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))  # its share of each phase


class PowerSampler:
    """Sample from p(x)^alpha with Metropolis-Hastings over a `Transformer` (see `generate`).

    model: a `Transformer` from `powersample_fast.load`, or a path / "default" to load one.
    eos_token_ids: overrides the model's EOS ids (config + generation_config + tokenizer).
    cuda_graphs: replay decode steps from CUDA graphs (`graphs.DecodeGraphs`); on CPU the same
    shape-static step runs eagerly. Off by default until measured on a GPU.
    """

    def __init__(self, model, tokenizer=None, *, eos_token_ids=None, max_batch: Optional[int] = None,
                 cuda_graphs: bool = False):
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from .loader import load

            model, tok = load(model)
            tokenizer = tokenizer if tokenizer is not None else tok
        if not isinstance(model, Transformer):
            raise ConfigError(
                f"PowerSampler needs a powersample_fast Transformer (got {type(model).__name__}); "
                "load one with powersample_fast.load(path), or use powersample_fast.paper for HF models"
            )
        self.model = model
        self.tokenizer = tokenizer
        ids = eos_token_ids if eos_token_ids is not None else model.config.eos_token_ids
        self.eos = frozenset(int(e) for e in ids)
        self.max_batch = max_batch
        self.cuda_graphs = bool(cuda_graphs)
        self.compact = True  # move chains down into free slots once the queue is drained
        self.last_stats: dict = {}

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def generate(self, prompts, *, alpha=4.0, max_new_tokens=3072, block_size=192, mcmc_steps=10,
                 proposal_temperature=None, top_k=None, index="uniform", n=1, seed=None, chat=False,
                 progress=True, max_batch=None) -> List[SampleResult]:
        """Power-sample every prompt `n` times. Returns one `SampleResult` per (prompt, sample), in
        order. Defaults follow the paper: alpha 4, proposal temperature 1/alpha, block 192, 10 MH
        steps per block, budget 3072 new tokens. A lower proposal temperature raises acceptance but
        mixes slowly across lengths (EOS); tau = 1 mixes fastest. With top_k, tokens outside the
        top-k of a position can never be proposed."""
        p = SamplingParams(alpha=alpha, max_new_tokens=max_new_tokens, block_size=block_size,
                           mcmc_steps=mcmc_steps, proposal_temperature=proposal_temperature, top_k=top_k,
                           index=index, n=n, seed=seed)
        ids = normalize_prompts(prompts, self.tokenizer, chat=chat)
        ctx, V = self.model.config.max_seq_len, self.model.config.vocab_size
        for i, pr in enumerate(ids):
            bad = [x for x in pr if not 0 <= x < V]
            if bad:
                raise ConfigError(f"prompt {i} has token id(s) outside the vocabulary [0, {V}): {bad[:5]}")
            if len(pr) + p.max_new_tokens > ctx:
                raise ConfigError(
                    f"prompt {i} has {len(pr)} tokens; with max_new_tokens={p.max_new_tokens} that exceeds the "
                    f"model's context of {ctx} tokens; shorten the prompt or lower max_new_tokens"
                )
        base = resolve_seed(seed)
        chains = [
            _Chain(pi, si, pr, s, random.Random(s))
            for pi, pr in enumerate(ids) for si in range(p.n)
            for s in [chain_seed(base, pi, si)]
        ]
        mb = next((x for x in (max_batch, self.max_batch) if x is not None),
                  64 if self.model.device.type == "cuda" else 8)
        if not isinstance(mb, int) or mb < 1:
            raise ConfigError(f"max_batch must be an integer >= 1 (got {mb!r})")
        slots = self._fit_slots(min(mb, len(chains)), max(len(c.prompt) for c in chains) + p.max_new_tokens, p)
        return _Run(self, p, chains, slots, progress).run()

    def _fit_slots(self, want: int, max_len: int, p: SamplingParams) -> int:
        """Chains decoded together, reduced (with a warning) so that the KV cache (2 rows per chain)
        and the per-token buffers take at most 90% of the free memory of the model's device."""
        cfg = self.model.config
        per_pos = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * self.model.dtype.itemsize
        per_slot = 2 * max_len * per_pos + 2 * p.max_new_tokens * (8 + 4 + 4)
        free = int(0.9 * free_memory_bytes(self.model.device))
        fit = free // per_slot
        if fit < 1:
            raise ConfigError(
                f"one chain needs {per_slot / 2**30:.2f} GiB of KV cache ({max_len} positions x 2 rows) but only "
                f"{free / 2**30:.2f} GiB is free on {self.model.device}; lower max_new_tokens or shorten the prompt"
            )
        if fit < want:
            warnings.warn(f"max_batch reduced from {want} to {fit} chains so the KV cache fits in the free memory "
                          f"of {self.model.device} ({per_slot / 2**20:.0f} MiB per chain)", stacklevel=3)
            return fit
        return want


class _Run:
    """State of one `generate` call."""

    def __init__(self, sampler: PowerSampler, p: SamplingParams, chains: List[_Chain], n_slots: int, progress):
        self.s, self.p, self.model = sampler, p, sampler.model
        self.queue = deque(chains)
        self.n_chains = len(chains)
        self.S = S = n_slots
        dev = self.model.device
        self.dev = dev
        T = p.max_new_tokens
        max_prompt = max(len(c.prompt) for c in chains)
        self.cache = KVCache(self.model.config, 2 * S, max_prompt + T, device=dev, dtype=self.model.dtype)
        # device buffers: index 0 = current state, 1 = proposal; [2, S, T]
        self.tok = torch.zeros(2, S, T, dtype=torch.int64, device=dev)
        self.lp = torch.zeros(2, S, T, dtype=torch.float32, device=dev)
        self.lq = torch.zeros(2, S, T, dtype=torch.float32, device=dev)
        self.compact_enabled = sampler.compact
        self.n_moves = 0
        self.decoder = None
        if sampler.cuda_graphs:
            from .graphs import DecodeGraphs

            self.decoder = DecodeGraphs(self.model, self.cache, S, use_graphs=dev.type == "cuda")
        self.slots: List[Optional[_Chain]] = [None] * S
        self.row_prompt: List[Optional[tuple]] = [None] * S  # prompt whose K/V [0, P-1) a work row holds
        self.feed = [0] * S  # token each slot feeds at its next decode step
        self.inv_tau = 1.0 / p.tau
        self.results: List[SampleResult] = []
        self.times = dict.fromkeys(PHASES, 0.0)
        self.progress = progress
        self.bar = None

    def charge(self, phase: str, t_start: float, chains: List[_Chain]):
        """Add the time since t_start to `phase`, and an equal share of it to each chain served."""
        dt = time.perf_counter() - t_start
        self.times[phase] += dt
        for c in chains:
            c.phase_s[phase] += dt / len(chains)

    # -------------------------------------------------------------- chain lifecycle
    def admit(self, b: int):
        c = self.queue.popleft()
        c.t0 = time.perf_counter()
        self.slots[b] = c
        P = len(c.prompt)
        key = tuple(c.prompt)
        # a row that already holds this prompt's K/V (a sibling sample, or this slot's last chain)
        src = b if self.row_prompt[b] == key else next(
            (r for r in range(self.S) if self.row_prompt[r] == key), None)
        t = time.perf_counter()
        if P == 1:
            self.cache.host_lengths[b] = 0
        elif src == b:
            self.cache.host_lengths[b] = P - 1
        elif src is not None:  # fork: copy positions [0, P-1) of the sibling's row
            with record_function("fork"):
                self.cache.fork([src], [b], [P - 1])
        else:  # prefill all but the last prompt token; the last runs in the first decode step
            self.cache.host_lengths[b] = 0
            with record_function("prefill"):
                x = torch.tensor([c.prompt[:-1]], dtype=torch.int64, device=self.dev)
                self.model.forward_cached(x, self.cache, rows=b, last_only=True)
            c.positions += P - 1
            c.prefilled += P
        self.row_prompt[b] = key
        self.charge("prefill_s", t, [c])
        self.start_extend(b, c)

    def start_extend(self, b: int, c: _Chain):
        c.phase, c.limit, c.steps_done = EXTEND, self.p.stage_limit(c.k), 0
        c.work = list(c.tokens)
        # fed at position P + t - 1: the state's last token, never fed yet (lazy feeding)
        self.feed[b] = c.tokens[-1] if c.tokens else c.prompt[-1]

    def start_proposal(self, b: int, c: _Chain, backups: list):
        t = len(c.tokens)
        lo = 0 if self.p.index == "uniform" else (c.k - 1) * self.p.block_size
        m = lo + c.rng.randrange(t - lo)
        P = len(c.prompt)
        c.phase, c.cut, c.work = PROPOSE, m, c.tokens[:m]
        c.proposed += 1
        if t - 1 - m > 0:
            backups.append((b, self.S + b, P + m, t - 1 - m))
        self.cache.truncate(b, P + m - 1)
        self.feed[b] = c.tokens[m - 1] if m > 0 else c.prompt[-1]  # re-fed at position P + m - 1

    def finish(self, b: int, c: _Chain):
        t = len(c.tokens)
        lp = self.lp[0, b, :t].tolist()
        lq = self.lq[0, b, :t].tolist()
        tok = self.s.tokenizer
        text = tok.decode(c.tokens, skip_special_tokens=True) if tok is not None else ""
        self.results.append(SampleResult(
            prompt_index=c.pi, sample_index=c.si, text=text, token_ids=list(c.tokens), logp=lp, logq=lq,
            accepted=c.accepted, proposed=c.proposed,
            finished_by_eos=bool(c.tokens) and c.tokens[-1] in self.s.eos,
            stats={"tokens_sampled": c.sampled, "tokens_decoded": c.sampled, "tokens_prefilled": c.prefilled,
                   "positions_computed": c.positions, "prompt_tokens": len(c.prompt),
                   "wall_s": time.perf_counter() - c.t0, **c.phase_s},
        ))
        self.slots[b] = None  # the row keeps its K/V (and length): a sibling may fork its prompt
        if self.bar is not None:
            self.bar.update(1)

    def stage_end(self, b: int, c: _Chain):
        """Called when the state of stage k is final (after its N MH steps)."""
        if (c.tokens and c.tokens[-1] in self.s.eos) or c.k >= self.p.num_blocks:
            self.finish(b, c)
            return
        c.k += 1
        self.start_extend(b, c)

    def after_state(self, b: int, c: _Chain, backups: list):
        """The state just changed (extension ended, or an MH step was decided)."""
        if c.steps_done < self.p.mcmc_steps:
            self.start_proposal(b, c, backups)
        else:
            self.stage_end(b, c)

    # -------------------------------------------------------------------- main loop
    def run(self) -> List[SampleResult]:
        t_start = time.perf_counter()
        if self.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.n_chains, desc="power sampling", unit="chain", dynamic_ncols=True)
        try:
            for b in range(self.S):
                if self.queue:
                    self.admit(b)
            n_steps, last_post = 0, time.perf_counter()
            while any(c is not None for c in self.slots):
                self.step()
                n_steps += 1
                if self.bar is not None and time.perf_counter() - last_post > 0.5:
                    last_post = time.perf_counter()
                    self.bar.set_postfix(self._postfix(t_start), refresh=False)
        finally:
            if self.bar is not None:
                self.bar.close()
        wall = time.perf_counter() - t_start
        self.results.sort(key=lambda r: (r.prompt_index, r.sample_index))
        sampled = sum(r.stats["tokens_sampled"] for r in self.results)
        acc = sum(r.accepted for r in self.results)
        prop = sum(r.proposed for r in self.results)
        self.s.last_stats = dict(
            self.times, wall_s=wall, decode_steps=n_steps, chains=self.n_chains, batch_slots=self.S,
            slot_moves=self.n_moves,
            tokens_sampled=sampled, tokens_prefilled=sum(r.stats["tokens_prefilled"] for r in self.results),
            positions_computed=sum(r.stats["positions_computed"] for r in self.results),
            tokens_per_s=sampled / wall if wall > 0 else float("nan"),
            accepted=acc, proposed=prop, acceptance_rate=acc / prop if prop else float("nan"),
        )
        return self.results

    def _postfix(self, t_start):
        active = [c for c in self.slots if c is not None]
        acc = sum(c.accepted for c in active) + sum(r.accepted for r in self.results)
        prop = sum(c.proposed for c in active) + sum(r.proposed for r in self.results)
        tok = sum(c.sampled for c in active) + sum(r.stats["tokens_sampled"] for r in self.results)
        return {"block": max((c.k for c in active), default=0), "acc": f"{acc / prop:.2f}" if prop else "-",
                "tok/s": f"{tok / (time.perf_counter() - t_start):.0f}"}

    def step(self):
        S, p = self.S, self.p
        active = [b for b in range(S) if self.slots[b] is not None]
        B = active[-1] + 1
        if self.decoder is not None:
            B = self.decoder.batch_size(B)
        for b in range(B):
            if self.slots[b] is None:  # idle slot inside the batch: feed a dummy token at position 0
                self.cache.host_lengths[b] = 0
                self.feed[b] = 0
                self.row_prompt[b] = None
        # one host->device copy per step: tokens to feed, random keys (chain seed, draws so far),
        # where each sampled token goes (phase buffer, position), and the rows' KV lengths
        keys, ph, pos = [0] * B, [0] * B, [0] * B
        for b in active:
            c = self.slots[b]
            keys[b] = reference.row_key_int(c.seed, c.sampled)
            ph[b], pos[b] = c.phase, len(c.work)
        t = time.perf_counter()
        with record_function("decode"):
            lengths = self.cache.host_lengths[:B]
            inp = torch.tensor([self.feed[:B], keys, ph, pos, lengths], dtype=torch.int64).to(self.dev)
            if self.decoder is not None:
                logits = self.decoder.step(inp[0], inp[4], B)  # [B, V]
            else:
                logits = self.model.forward_cached(inp[0, :, None], self.cache, rows=slice(0, B),
                                                   start_pos=inp[4])[:, 0]  # [B, V]
        with record_function("sample"):
            thr = ops.topk_threshold(logits, p.top_k)
            tok, lp, lq = ops.sample_logprobs(logits, inp[1], self.inv_tau, thr)
            idx = (inp[2], torch.arange(B, device=self.dev), inp[3])
            self.tok.index_put_(idx, tok)
            self.lp.index_put_(idx, lp)
            self.lq.index_put_(idx, lq)
            ok = torch.isfinite(lp) & torch.isfinite(lq)
            host = torch.where(ok, tok, -1).tolist()  # the one host sync per step
        self.charge("decode_s", t, [self.slots[b] for b in active])

        ended_prop, backups = [], []
        for b in active:
            c = self.slots[b]
            token = host[b]
            if token < 0:
                raise NonFiniteLogitsError(
                    f"non-finite logits (NaN/Inf) while sampling chain (prompt {c.pi}, sample {c.si}) at "
                    f"generated position {len(c.work)}; check the model weights and dtype (float16 overflow?)"
                )
            c.work.append(token)
            c.sampled += 1
            c.positions += 1
            if token in self.s.eos or len(c.work) >= c.limit:
                if c.phase == EXTEND:
                    c.tokens = c.work
                    self.after_state(b, c, backups)
                else:
                    ended_prop.append(b)
            else:
                self.feed[b] = token
        if ended_prop:
            self.accept(ended_prop, backups)
        if backups:
            t = time.perf_counter()
            with record_function("fork"):
                self.cache.copy_range(*zip(*backups))
            self.charge("kv_copy_s", t, [self.slots[b[0]] for b in backups])
        for b in range(S):  # refill finished slots from the queue
            if self.slots[b] is None and self.queue:
                self.admit(b)
        if not self.queue and self.compact_enabled:
            self.compact()

    def compact(self):
        """Queue drained: move the highest-numbered chains into free lower slots, so the decode
        batch (rows 0..highest active) shrinks as chains finish. A move copies the chain's K/V
        (and its proposal backup) in one kv_copy_ launch, and its device buffers and stream."""
        moves = []
        while True:
            free = [b for b in range(self.S) if self.slots[b] is None]
            active = [b for b in range(self.S) if self.slots[b] is not None]
            if not free or not active or free[0] > active[-1]:
                break
            f, h = free[0], active[-1]
            c = self.slots[h]
            self.slots[f], self.slots[h] = c, None
            self.feed[f] = self.feed[h]
            self.row_prompt[f] = self.row_prompt[h]
            self.cache.host_lengths[f] = self.cache.host_lengths[h]  # row h keeps its K/V and length
            moves.append((h, f, c))
        if not moves:
            return
        t = time.perf_counter()
        copies = []
        for h, f, c in moves:
            copies.append((h, f, 0, self.cache.host_lengths[f]))
            if c.phase == PROPOSE:  # the current state's backed-up suffix
                P, n = len(c.prompt), len(c.tokens) - 1 - c.cut
                if n > 0:
                    copies.append((self.S + h, self.S + f, P + c.cut, n))
        with record_function("fork"):
            self.cache.copy_range(*zip(*copies))
            hs = torch.tensor([m[0] for m in moves], device=self.dev)
            fs = torch.tensor([m[1] for m in moves], device=self.dev)
            for buf in (self.tok, self.lp, self.lq):
                buf[:, fs] = buf[:, hs]
        self.charge("kv_copy_s", t, [m[2] for m in moves])
        self.n_moves += len(moves)

    def accept(self, rows: List[int], backups: list):
        t0 = time.perf_counter()
        p, dev = self.p, self.dev
        cs = [self.slots[b] for b in rows]
        cur_h, prop_h = [0] * self.S, [0] * self.S
        for b, c in zip(rows, cs):
            cur_h[b], prop_h[b] = len(c.tokens), len(c.work)
        base = [0 if p.index == "uniform" else (c.k - 1) * p.block_size for c in cs]
        log_u = [math.log(1.0 - c.rng.random()) for c in cs]  # u in (0, 1]
        t = lambda xs, dt=torch.int64: torch.tensor(xs, dtype=dt, device=dev)  # noqa: E731
        with record_function("accept"):
            acc, _ = ops.mh_accept_(self.tok[0], self.lp[0], self.lq[0], t(cur_h),
                                    self.tok[1], self.lp[1], self.lq[1], t(prop_h),
                                    t(rows), t([c.cut for c in cs]), t(base), t(log_u, torch.float32), p.alpha)
            acc = acc.tolist()
        restores = []
        for b, c, a in zip(rows, cs, acc):
            P, tlen = len(c.prompt), len(c.tokens)
            if a:
                c.accepted += 1
                c.tokens = c.work
            elif tlen - 1 - c.cut > 0:
                restores.append((self.S + b, b, P + c.cut, tlen - 1 - c.cut))
            self.cache.host_lengths[b] = P + len(c.tokens) - 1
            c.steps_done += 1
        self.charge("accept_s", t0, cs)
        if restores:
            t1 = time.perf_counter()
            with record_function("fork"):
                self.cache.copy_range(*zip(*restores))
            self.charge("kv_copy_s", t1, [self.slots[r[1]] for r in restores])
        for b, c in zip(rows, cs):
            self.after_state(b, c, backups)
