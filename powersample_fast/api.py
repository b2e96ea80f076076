"""The front door: `PowerSampler.generate(prompts, method=..., ...)`, a thin wrapper over the engine
(`powersample_fast.engine`) with a progress bar; it does not sample itself (the engine's runner does).
Methods: "mh" (Algorithm 1, exact power sampling; `engine/policies/mh.py` says how the KV cache is
reused), "plain" (ancestral sampling, the baseline), "smc" (Power-SMC, `engine/policies/smc.py`),
"sps" (Scalable Power Sampling, block level, `engine/policies/sps_block.py`) and "sps_token" (its
token-level variant, `engine/policies/sps_token.py`)."""
from __future__ import annotations

import dataclasses
import inspect
import time
from typing import List, Optional

import torch

from .device import resolve_max_batch
from .engine import Engine
from .errors import ConfigError, PowerSampleError
from .models.loader import load
from .models.transformer import Transformer
from .prompts import normalize_prompts
from .sampling_params import SamplingParams, resolve_seed
from .engine.policies import get_policy
from .outputs import SampleResult
from .entrypoints.work_limits import check_work, planned_tokens_per_chain


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
            model, tok = load(model)
            tokenizer = tokenizer if tokenizer is not None else tok
        if not isinstance(model, Transformer):
            raise ConfigError(
                f"PowerSampler needs a powersample_fast Transformer (got {type(model).__name__}); "
                "load one with powersample_fast.load(path), or use powersample_fast.entrypoints.paper for HF models"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids  # None: the model's (the engine builds the set)
        self.max_batch = max_batch
        self.cuda_graphs = bool(cuda_graphs)
        self.compact = True  # move chains down into free rows once the queue is drained
        self.last_stats: dict = {}

    @torch.inference_mode()
    def generate(self, prompts, *, chat=None, progress=True, max_batch=None, errors="raise", allow_long=False,
                 **sampling) -> List[SampleResult]:
        """Sample every prompt `n` times. Returns one `SampleResult` per (prompt, sample), in order.

        `sampling`: any `SamplingParams` field (method, alpha, max_new_tokens, block_size, mcmc_steps,
        proposal_temperature, top_k, index, n, seed, early_stop, and each method's own), with the
        defaults there (the papers'); `inspect.signature(PowerSampler.generate)` lists them all.

        method="mh": power sampling, defaults from the paper: alpha 4, proposal temperature 1/alpha,
        block 192, 10 MH steps per block, budget 3072 new tokens. A lower proposal temperature raises
        acceptance but mixes slowly across lengths (EOS); tau = 1 mixes fastest. With top_k, tokens
        outside the top-k of a position can never be proposed. A chain whose state ends with EOS
        before the last stage runs the final stage's MH steps (exact); early_stop=True stops it
        there (the paper's code: cheaper, not exact). Faster mixing, still exact (ALGORITHM.md):
        index="entropy" cuts at position m with probability proportional to
        entropy_eps + h_m ** entropy_beta (h_m: the base model's next-token entropy there);
        mh_tries=k runs multiple-try Metropolis (k proposals + k - 1 reference draws from the same
        cut, 2k - 1 decode rows per chain, decoded together). method="plain": ancestral sampling at
        `proposal_temperature` (default 1) and top_k.

        method="smc" (Power-SMC, approximate, consistent as N grows): `particles` N decode from the
        proposal (temperature default 1/alpha, top_k), resampled (systematic) when the ESS drops
        below ess_threshold * N (checked every `resample_every` tokens); alpha_ramp_tokens > 0
        bridges the exponent from 1 to alpha (same final target). Returns one particle drawn in
        proportion to its weight; extra: log_evidence, resampling_events, ess_trace (and with
        return_all, every particle with its normalised weight). The paper uses N = 64.
        method="sps" (Scalable Power Sampling, block level, approximate): per block of block_size
        tokens, sps_candidates blocks sampled from p, the sps_top_k most likely distinct ones get
        sps_rollouts rollouts of at most sps_horizon tokens each, one block is drawn from the
        jackknife-corrected estimate of p^alpha; paper defaults B = 192, K = M = 8 (L and H are not
        given there; 64 and 192 here). method="sps_token": the token-level algorithm (K tokens per
        token, ~H+1 sequential steps per token). max_batch counts decode rows: a sample takes 2k - 1
        rows (mh, mh_tries=k), N rows (smc), max(L, K*M) rows (sps) or 1 + K*M rows (sps_token).

        top_p (method "plain"): nucleus sampling. stop: stop strings (plain stops at one; the samplers
        treat one like EOS: ALGORITHM.md "Stop strings"); needs the tokenizer. logprobs: N >= 0 fills
        each result's `token_logprobs` / `top_logprobs` (the N most likely tokens per position);
        prompt_logprobs: N likewise for the prompt, in each result's `prompt_logprobs`.

        chat: None applies the tokenizer's chat template to text prompts when it has one.
        errors: "raise" (default) raises the first chain error (e.g. NonFiniteLogitsError) after the
        other chains finished, with every result attached as `error.results`; "return" returns them,
        the failed ones with `extra["error"]`.

        Bounds (`work_limits.check_work`, before anything is allocated): a call whose chains need more
        memory than is available is refused, and one that plans more than 1e9 decode tokens (n x the
        method's tokens per chain) unless allow_long=True."""
        p = SamplingParams(**sampling)
        if errors not in ("raise", "return"):
            raise ConfigError(f"errors must be 'raise' or 'return' (got {errors!r})")
        ids = normalize_prompts(prompts, self.tokenizer, chat=chat)
        check_work(p, len(ids), allow_long=allow_long)
        p = dataclasses.replace(p, seed=resolve_seed(p.seed))
        mb = resolve_max_batch(max_batch if max_batch is not None else self.max_batch, self.model.device)
        n_rows, n_store = get_policy(p.method).rows(p)
        # decode rows: whole samples (n_rows each: 1, N particles, max(L, K*M) or 1 + K*M), at least one
        rows = n_rows * max(1, min(mb, len(ids) * p.n * n_rows) // n_rows)
        # store rows: one per decode row (mh), none (plain, smc, sps), one per 2k - 1 (mh_tries = k)
        store = None if n_store == n_rows else (rows // n_rows) * n_store
        eng = Engine(self.model, self.tokenizer, eos_token_ids=self.eos_token_ids, max_batch=rows,
                     max_len=max(map(len, ids)) + p.max_new_tokens, store_rows=store,
                     cuda_graphs=self.cuda_graphs, compact=self.compact)
        for i, pr in enumerate(ids):
            eng.check_prompt(pr, p, i)
        for i, pr in enumerate(ids):
            eng.add_request(pr, p, prompt_index=i)
        t0 = time.perf_counter()
        results, err = self._drive(eng, planned_tokens_per_chain(p), len(ids) * p.n, progress)
        results.sort(key=lambda r: (r.prompt_index, r.sample_index))
        self.last_stats = _summary(eng, results, p.method, time.perf_counter() - t0)
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
    chains = [s.group.state for s in eng.kv.decode_holders() if hasattr(s.group.state, "k")]
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
        eng.times, method=method, wall_s=wall, decode_steps=eng.stats["decode_steps"], row_steps=eng.stats["row_steps"],
        row_steps_skipped=eng.stats["row_steps_skipped"], chains=len(results),
        batch_slots=eng.kv.n_decode, max_batch_rows=eng.stats["max_batch_rows"], slot_moves=eng.scheduler.moves,
        kv_copy_launches=eng.kv.copies.launches, tokens_sampled=sampled,
        tokens_prefilled=sum(r.stats["tokens_prefilled"] for r in results),
        positions_computed=sum(r.stats["positions_computed"] for r in results),
        tokens_per_s=sampled / wall if wall > 0 else float("nan"),
        accepted=acc, proposed=prop, acceptance_rate=acc / prop if prop else float("nan"),
    )


def _generate_signature() -> inspect.Signature:
    """generate's signature with every SamplingParams field spelled out (for help() and editors)."""
    sig = inspect.signature(PowerSampler.generate)
    fixed = [q for q in sig.parameters.values() if q.kind is not inspect.Parameter.VAR_KEYWORD]
    fields = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
              for f in dataclasses.fields(SamplingParams)]
    return sig.replace(parameters=fixed + fields)


PowerSampler.generate.__signature__ = _generate_signature()

__all__ = ["PowerSampler", "PowerSampleError"]
