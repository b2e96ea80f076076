"""`PowerSampler.generate`: a thin wrapper over the engine (`powersample_fast.engine`) with a progress
bar. Methods: "mh" (Algorithm 1, exact power sampling; `policies/mh.py` says how the KV cache is
reused), "plain" (ancestral sampling, the baseline), "smc" (Power-SMC, `policies/smc.py`) and "sps"
(Scalable Power Sampling, `policies/sps.py`)."""
from __future__ import annotations

import dataclasses
import time
from typing import List, Optional

import torch

from .engine import Engine
from .errors import ConfigError, PowerSampleError
from .model import Transformer
from .params import SamplingParams, normalize_prompts, resolve_seed
from .policies import get_policy
from .types import SampleResult


class PowerSampler:
    """Sample from p(x)^alpha (or plainly) over a `Transformer` (see `generate`).

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
        self.compact = True  # move chains down into free rows once the queue is drained
        self.last_stats: dict = {}

    @torch.inference_mode()
    def generate(self, prompts, *, method="mh", alpha=4.0, max_new_tokens=3072, block_size=192, mcmc_steps=10,
                 proposal_temperature=None, top_k=None, index="uniform", n=1, seed=None, early_stop=False,
                 chat=None, progress=True, max_batch=None, errors="raise", particles=64, ess_threshold=0.5,
                 resample_every=1, alpha_ramp_tokens=0, return_all=False, sps_top_k=8, sps_rollouts=8,
                 sps_horizon=192) -> List[SampleResult]:
        """Sample every prompt `n` times. Returns one `SampleResult` per (prompt, sample), in order.

        method="mh": power sampling, defaults from the paper: alpha 4, proposal temperature 1/alpha,
        block 192, 10 MH steps per block, budget 3072 new tokens. A lower proposal temperature raises
        acceptance but mixes slowly across lengths (EOS); tau = 1 mixes fastest. With top_k, tokens
        outside the top-k of a position can never be proposed. A chain whose state ends with EOS
        before the last stage runs the final stage's MH steps (exact); early_stop=True stops it
        there (the paper's code: cheaper, not exact). method="plain": ancestral sampling at
        `proposal_temperature` (default 1) and top_k.

        method="smc" (Power-SMC, approximate, consistent as N grows): `particles` N decode from the
        proposal (temperature default 1/alpha, top_k), resampled (systematic) when the ESS drops
        below ess_threshold * N (checked every `resample_every` tokens); alpha_ramp_tokens > 0
        bridges the exponent from 1 to alpha (same final target). Returns one particle drawn in
        proportion to its weight; extra: log_evidence, resampling_events, ess_trace (and with
        return_all, every particle with its normalised weight). The paper uses N = 64.
        method="sps" (Scalable Power Sampling, token level, approximate): per token the sps_top_k
        most likely tokens, sps_rollouts rollouts of at most sps_horizon tokens from p each,
        jackknife-corrected; paper defaults K = M = 8 (H is not given there; 192 here).
        max_batch counts decode rows: a sample takes N rows (smc) or 1 + K*M rows (sps).

        chat: None applies the tokenizer's chat template to text prompts when it has one.
        errors: "raise" (default) raises the first chain error (e.g. NonFiniteLogitsError) after the
        other chains finished, with every result attached as `error.results`; "return" returns them,
        the failed ones with `extra["error"]`."""
        p = SamplingParams(method=method, alpha=alpha, max_new_tokens=max_new_tokens, block_size=block_size,
                           mcmc_steps=mcmc_steps, proposal_temperature=proposal_temperature, top_k=top_k,
                           index=index, n=n, seed=seed, early_stop=early_stop, particles=particles,
                           ess_threshold=ess_threshold, resample_every=resample_every,
                           alpha_ramp_tokens=alpha_ramp_tokens, return_all=return_all, sps_top_k=sps_top_k,
                           sps_rollouts=sps_rollouts, sps_horizon=sps_horizon)
        if errors not in ("raise", "return"):
            raise ConfigError(f"errors must be 'raise' or 'return' (got {errors!r})")
        ids = normalize_prompts(prompts, self.tokenizer, chat=chat)
        p = dataclasses.replace(p, seed=resolve_seed(seed))
        mb = next((x for x in (max_batch, self.max_batch) if x is not None),
                  64 if self.model.device.type == "cuda" else 8)
        if not isinstance(mb, int) or isinstance(mb, bool) or mb < 1:
            raise ConfigError(f"max_batch must be an integer >= 1 (got {mb!r})")
        n_rows, n_store = get_policy(method).rows(p)
        # decode rows: whole samples (n_rows each: 1, or N particles, or 1 + K*M), at least one
        rows = n_rows * max(1, min(mb, len(ids) * p.n * n_rows) // n_rows)
        eng = Engine(self.model, self.tokenizer, eos_token_ids=sorted(self.eos), max_batch=rows,
                     max_len=max(map(len, ids)) + p.max_new_tokens, store_rows=None if n_store else 0,
                     cuda_graphs=self.cuda_graphs, compact=self.compact)
        for i, pr in enumerate(ids):
            eng.check_prompt(pr, p, i)
        for i, pr in enumerate(ids):
            eng.add_request(pr, p, prompt_index=i)
        t0 = time.perf_counter()
        results, err = self._drive(eng, get_policy(method).planned_tokens(p), len(ids) * p.n, progress)
        results.sort(key=lambda r: (r.prompt_index, r.sample_index))
        self.last_stats = _summary(eng, results, method, time.perf_counter() - t0)
        if err is not None and errors == "raise":
            err.results = results
            raise err
        return results

    def _drive(self, eng: Engine, per_chain: float, chains: int, progress: bool):
        """Step the engine to the end. Progress in tokens sampled against the planned budget
        (`per_chain` expected tokens per chain; a finished chain's plan is replaced by what it used),
        so the ETA is meaningful; redrawn at most every 0.5 s, on every step after that."""
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=round(per_chain * chains), desc="power sampling", unit="tok", dynamic_ncols=True,
                       mininterval=0.5, smoothing=0.1)
        results, err, last, planned = [], None, 0, per_chain * chains
        try:
            while eng.has_unfinished():
                for o in eng.step():
                    if o.finished:
                        results += o.results
                        err = err or o.error
                        planned += sum(r.stats["tokens_sampled"] - per_chain for r in o.results)
                if bar is not None:
                    done = eng.stats["tokens_sampled"]
                    bar.total = max(done, round(planned))
                    bar.set_postfix_str(_postfix(eng, results), refresh=False)
                    bar.update(done - last)
                    last = done
        finally:
            if bar is not None:
                bar.total = bar.n  # chains that ended at EOS used less than planned
                bar.close()
        return results, err


def _postfix(eng: Engine, results) -> str:
    """Fixed-width figures: chains done, the furthest block of a running MH chain, acceptance."""
    chains = [s.group.state for s in eng.scheduler.row_seq.values() if hasattr(s.group.state, "k")]
    acc = sum(c.accepted for c in chains) + sum(r.accepted for r in results)
    prop = sum(c.proposed for c in chains) + sum(r.proposed for r in results)
    total = len(results) + sum(len(r.groups) for r in eng.requests.values())
    out = f"chains {len(results)}/{total}"
    if chains:
        out += f", block {max(c.k for c in chains):>3d}"
    if prop or chains:
        out += f", acc {acc / prop if prop else 0:.2f}"
    return out


def _summary(eng: Engine, results: List[SampleResult], method: str, wall: float) -> dict:
    sampled = sum(r.stats["tokens_sampled"] for r in results)
    acc = sum(r.accepted for r in results)
    prop = sum(r.proposed for r in results)
    return dict(
        eng.times, method=method, wall_s=wall, decode_steps=eng.stats["decode_steps"], chains=len(results),
        batch_slots=eng.kv.n_decode, max_batch_rows=eng.stats["max_batch_rows"], slot_moves=eng.scheduler.moves,
        kv_copy_launches=eng.kv.launches, tokens_sampled=sampled,
        tokens_prefilled=sum(r.stats["tokens_prefilled"] for r in results),
        positions_computed=sum(r.stats["positions_computed"] for r in results),
        tokens_per_s=sampled / wall if wall > 0 else float("nan"),
        accepted=acc, proposed=prop, acceptance_rate=acc / prop if prop else float("nan"),
    )


__all__ = ["PowerSampler", "PowerSampleError"]
