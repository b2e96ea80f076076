"""The naive baseline: Algorithm 1 (ALGORITHM.md) computed the way the paper's code does it.

Every extension and every MH proposal is one call of HF ``model.generate`` on the whole kept prefix
(prompt + x_{<m}), one chain at a time, so the prefix is re-processed on every call (counted in
``stats["tokens_prefilled"]``): this is the recomputation ``PowerSampler`` avoids. The semantics are
those of ALGORITHM.md, not of the authors' code: a proposal runs to EOS or the stage limit L_k (it
may be longer than the current state), the whole suffixes are compared, the index term
log(t) - log(t') is included, HF's default ``top_k=50`` is switched off, and a chain whose state
ends with EOS before the last stage runs the final stage's MH steps (ALGORITHM.md step 3; the
paper's early stop with ``early_stop=True``), exactly as ``PowerSampler`` does.

Per-token lp/lq are recomputed in fp32 from the raw logits that ``generate`` returns
(``output_logits=True``): lp = log_softmax(z)[tok], lq = log_softmax(topk(z) / tau)[tok], the same
distribution HF sampled from (TemperatureLogitsWarper then TopKLogitsWarper, ties kept).
"""
from __future__ import annotations

import contextlib
import math
import pathlib
import random
import time
from typing import List, Optional, Tuple

import torch

from .device import default_device, default_dtype, resolve_dtype
from .errors import ConfigError, ModelLoadError, NonFiniteLogitsError
from .models.tokenizer import merge_eos_ids
from .ops.reference import topk_threshold
from .outputs import SampleResult
from .prompts import normalize_prompts
from .sampling_params import SamplingParams, chain_seed, resolve_seed


def _mask_top_k(z: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    # HF TopKLogitsWarper and reference.topk_threshold: drop logits strictly below the k-th largest
    # (ties at the threshold kept).
    thr = topk_threshold(z, top_k)
    return z if thr is None else z.masked_fill(z < thr[:, None], float("-inf"))


class NaiveSampler:
    """Power sampling by repeated HF ``generate`` calls (the paper's compute pattern).

    model: a transformers causal LM or a path to an HF-format directory. eos_token_ids: int or list;
    None reads them from the generation config, the model config and the tokenizer (all are
    collected); an empty list means the model has no EOS (chains always run to max_new_tokens).
    """

    def __init__(self, model, tokenizer=None, eos_token_ids=None, device=None, dtype=None):
        if isinstance(model, (str, pathlib.Path)):
            model, tokenizer = _load_hf(pathlib.Path(model), tokenizer, device, dtype)
        self.model = model.eval()
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            gen_cfg = getattr(model, "generation_config", None)
            eos_token_ids = merge_eos_ids(
                getattr(gen_cfg, "eos_token_id", None),
                getattr(model.config, "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None),
            )
        self.eos_token_ids = list(merge_eos_ids(eos_token_ids))
        text_cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(text_cfg.vocab_size)
        self.max_positions = getattr(text_cfg, "max_position_embeddings", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = int(pad) if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------------------------------
    def generate(
        self,
        prompts,
        *,
        alpha: float = 4.0,
        max_new_tokens: int = 3072,
        block_size: int = 192,
        mcmc_steps: int = 10,
        proposal_temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        index: str = "uniform",
        n: int = 1,
        seed: Optional[int] = None,
        early_stop: bool = False,
        chat: bool = False,
        progress: bool = True,
    ) -> List[SampleResult]:
        params = SamplingParams(
            alpha=alpha, max_new_tokens=max_new_tokens, block_size=block_size, mcmc_steps=mcmc_steps,
            proposal_temperature=proposal_temperature, top_k=top_k, index=index, n=n, seed=seed,
            early_stop=early_stop,
        )
        if params.index == "entropy":  # the baseline is Algorithm 1 as written (uniform / last_block cuts)
            raise ConfigError("the naive baseline has index='uniform' and 'last_block' only (entropy: PowerSampler)")
        prompt_ids = normalize_prompts(prompts, self.tokenizer, chat=chat)
        for i, p in enumerate(prompt_ids):
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise ConfigError(f"prompt {i} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
            if self.max_positions is not None and len(p) + params.max_new_tokens > self.max_positions:
                raise ConfigError(
                    f"prompt {i} ({len(p)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
                    f"max_position_embeddings ({self.max_positions}); shorten the prompt or lower max_new_tokens"
                )
        base_seed = resolve_seed(params.seed)
        jobs = [(pi, si) for pi in range(len(prompt_ids)) for si in range(params.n)]
        from tqdm.auto import tqdm

        results = []
        for pi, si in tqdm(jobs, desc="naive power sampling", unit="chain", disable=not progress):
            results.append(self._chain(prompt_ids[pi], params, pi, si, chain_seed(base_seed, pi, si)))
        return results

    # ------------------------------------------------------------------------------------------
    def _chain(self, prompt: List[int], params: SamplingParams, pi: int, si: int, seed: int) -> SampleResult:
        t0 = time.perf_counter()
        torch.manual_seed(seed)  # HF generate samples from torch's global RNG
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        rng = random.Random(seed)  # cut indices and MH uniforms
        alpha, tau, B = float(params.alpha), params.tau, params.block_size
        x: List[int] = []
        lp: List[float] = []
        lq: List[float] = []
        stats = {"tokens_sampled": 0, "tokens_decoded": 0, "tokens_prefilled": 0, "generate_calls": 0}
        accepted = proposed = 0
        k, jumped, K = 1, False, params.num_blocks
        while True:
            limit = params.stage_limit(k)
            base = (k - 1) * B if params.index == "last_block" else 0
            # 1. extend from t to EOS or L_k (not after a jump: the state is final-stage already)
            if not jumped:
                tok, tlp, tlq = self._propose(prompt, x, limit, tau, params.top_k, stats)
                x, lp, lq = x + tok, lp + tlp, lq + tlq
            # 2. MH steps
            for _ in range(params.mcmc_steps):
                t = len(x)
                m = rng.randrange(base, t)
                tok, tlp, tlq = self._propose(prompt, x[:m], limit, tau, params.top_k, stats)
                t_new = m + len(tok)
                log_a = (
                    alpha * (math.fsum(tlp) - math.fsum(lp[m:]))
                    + (math.fsum(lq[m:]) - math.fsum(tlq))
                    + math.log(t - base) - math.log(t_new - base)
                )
                u = rng.random()
                log_u = math.log(u) if u > 0.0 else -math.inf
                proposed += 1
                if log_u < log_a:
                    accepted += 1
                    x, lp, lq = x[:m] + tok, lp[:m] + tlp, lq[:m] + tlq
            # 3. EOS before the last stage: jump to the final stage's N steps (or stop: early_stop,
            #    last_block, N = 0); after the last stage the chain is finished
            ends_eos = bool(x) and x[-1] in self.eos_token_ids
            if k >= K or (ends_eos and (params.early_stop or params.index == "last_block" or params.mcmc_steps == 0)):
                break
            k, jumped = (K, True) if ends_eos else (k + 1, False)
        stats["wall_s"] = time.perf_counter() - t0
        text = self.tokenizer.decode(x, skip_special_tokens=True) if self.tokenizer is not None else ""
        return SampleResult(
            prompt_index=pi, sample_index=si, text=text, token_ids=list(x), logp=lp, logq=lq,
            accepted=accepted, proposed=proposed,
            finished_by_eos=bool(x) and x[-1] in self.eos_token_ids, stats=stats,
            extra={"stage": k, "jumped_to_final_stage": jumped},
        )

    def _propose(self, prompt, kept, limit, tau, top_k, stats) -> Tuple[List[int], List[float], List[float]]:
        """One ``generate`` call on prompt + kept: tokens from position len(kept) until EOS or
        ``limit``, with their fp32 lp and lq."""
        prefix = list(prompt) + list(kept)
        budget = limit - len(kept)
        ids = torch.tensor([prefix], dtype=torch.long, device=self.device)
        with _clean_generation_defaults(self.model), torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), generation_config=_generation_config(budget, tau, top_k, self.eos_token_ids, self.pad_token_id)
            )
        new = out.sequences[0, len(prefix):].tolist()
        z = torch.cat(out.logits, dim=0).float()  # z: [n_new, V] raw logits (before any processor)
        _check_generate(new, z, budget, self.eos_token_ids)
        tokens = torch.tensor(new, device=z.device)[:, None]
        lp = torch.log_softmax(z, dim=-1).gather(1, tokens)[:, 0]
        lq = torch.log_softmax(_mask_top_k(z, top_k) / tau, dim=-1).gather(1, tokens)[:, 0]
        stats["generate_calls"] += 1
        stats["tokens_prefilled"] += len(prefix)
        stats["tokens_decoded"] += len(new)
        stats["tokens_sampled"] += len(new)
        return new, lp.tolist(), lq.tolist()


@contextlib.contextmanager
def _clean_generation_defaults(model):
    """Swap the model's generation_config for a blank one during a call, so no checkpoint default
    (top_k=50, repetition_penalty, min_p, suppress_tokens, ...) can leak into sampling."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def naive_generate(model, prompts, *, tokenizer=None, eos_token_ids=None, **kwargs) -> List[SampleResult]:
    """One-shot convenience: ``NaiveSampler(model, tokenizer, eos_token_ids).generate(prompts, **kwargs)``."""
    return NaiveSampler(model, tokenizer=tokenizer, eos_token_ids=eos_token_ids).generate(prompts, **kwargs)


def _load_hf(path: pathlib.Path, tokenizer, device, dtype):
    """An HF causal LM (and its tokenizer, if the directory has one) from an HF-format directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not an HF model directory (no config.json)")
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype) if dtype is not None else default_dtype(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        raise ModelLoadError(f"cannot load an HF causal LM from {path}: {e}") from e
    if tokenizer is None and any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def _generation_config(budget: int, tau: float, top_k: Optional[int], eos_ids: List[int], pad_id: int):
    """The GenerationConfig of one proposal: sampling at `tau` (top_k), every other processor neutral."""
    from transformers import GenerationConfig

    # Every field that can change the sampled law is set to its neutral value; fields whose
    # only neutral value is None (min_p, bad_words_ids, suppress_tokens, ...) are protected by
    # _clean_generation_defaults, since generate fills unset (None) fields from the model's
    # own generation_config.
    return GenerationConfig(
        do_sample=True, num_beams=1, num_return_sequences=1,
        temperature=float(tau), top_k=int(top_k) if top_k else 0, top_p=1.0, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, min_new_tokens=0,
        renormalize_logits=False, remove_invalid_values=False,
        max_new_tokens=budget, eos_token_id=list(eos_ids) or None,
        pad_token_id=pad_id, use_cache=True,
        output_logits=True, output_scores=False, return_dict_in_generate=True,
    )


def _check_generate(new: List[int], z: torch.Tensor, budget: int, eos: List[int]) -> None:
    """`generate` returned one logit row per token, stopped at the first EOS or the budget, finitely."""
    if len(new) != z.shape[0] or not 1 <= len(new) <= budget:
        raise RuntimeError(f"generate returned {len(new)} tokens and {z.shape[0]} logits for a budget of {budget}")
    if any(t in eos for t in new[:-1]) or (len(new) < budget and new[-1] not in eos):
        raise RuntimeError(f"generate did not stop exactly at the first EOS {eos}: {new}")
    if not torch.isfinite(z).all():
        raise NonFiniteLogitsError("the model produced NaN/Inf logits; check the checkpoint and dtype")
