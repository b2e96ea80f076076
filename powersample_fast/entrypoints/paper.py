"""Drop-in replacement for the reference code's `mcmc_power_samp` (Karan & Du, power_samp_utils.py).

    # before: from power_samp_utils import mcmc_power_samp
    from powersample_fast.entrypoints.paper import mcmc_power_samp

`p` carries `.model` (a transformers causal LM of a supported family, or our `Transformer`) and
`.tokenizer`. The call runs on this engine (KV reuse, exact MH per ALGORITHM.md) with the same
weights; the HF model is converted once and cached. Differences from the reference, on purpose:
proposals may grow past the current length after an early EOS, the full suffixes and the index term
enter the acceptance ratio, and HF's default top_k=50 is not applied (see ALGORITHM.md).
"""
from __future__ import annotations

import weakref
from typing import List, Tuple

from ..errors import ConfigError
from ..api import PowerSampler
from ..models.loader import from_hf_model
from ..models.transformer import Transformer
from ..prompts import normalize_prompts
from ..coercions import as_int, as_real

_converted: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _engine_model(model) -> Transformer:
    if isinstance(model, Transformer):
        return model
    try:
        return _converted[model]
    except (KeyError, TypeError):
        pass
    ours = from_hf_model(model)
    try:
        _converted[model] = ours
    except TypeError:  # not weak-referenceable
        pass
    return ours


def _context_ids(context) -> List[int]:
    """The reference takes a flat list of ids (`tokenizer.encode(...)`); also accept what
    `tokenizer(..., return_tensors="pt").input_ids` gives (a [1, T] tensor), a 1-D tensor or array,
    and [[...]]. Always one context: a batch of several is an error, as in the reference."""
    if isinstance(context, str):
        raise ConfigError("context must be token ids (e.g. tokenizer.encode(prompt)), not text")
    ids = normalize_prompts(context, None)
    if len(ids) != 1:
        raise ConfigError(f"context must be one sequence of token ids (a list, a 1-D tensor or a [1, T] tensor); "
                          f"got {len(ids)} sequences: call mcmc_power_samp once per context, as the reference")
    return ids[0]


def mcmc_power_samp(p, context, temp, mcmc_steps, max_new_tokens, block_num=16, *, seed=None, top_k=None,
                    progress=False, index="uniform", mh_tries=1, entropy_eps=0.1,
                    entropy_beta=1.0) -> Tuple[List[int], List[float], List[float], float]:
    """Same signature and return values as the reference: (context + generated ids, one flat list of
    ints whatever the context's form, see `_context_ids`; per-token proposal log-probs log q;
    per-token target log-probs alpha*log p with alpha = 1/temp; acceptance ratio). The block size is
    ceil(max_new_tokens / block_num) (the reference asserts divisibility; we do not need it).
    Keyword-only extras (not in the reference): seed, top_k, progress, and the exact mixing options
    index="entropy" (entropy_eps, entropy_beta) and mh_tries=k (see ALGORITHM.md "Faster mixing");
    the acceptance ratio counts one decision per MH step, whatever k."""
    temp_f, block_num = as_real(temp), as_int(block_num)
    if temp_f is None or not temp_f > 0:
        raise ConfigError(f"temp must be > 0 (alpha = 1/temp); got {temp!r}")
    if block_num is None or block_num < 1:
        raise ConfigError(f"block_num must be an integer >= 1 (got {block_num!r})")
    temp = temp_f
    model = getattr(p, "model", None)
    if model is None:
        raise ConfigError("p must carry .model (and .tokenizer), like the reference AutoregressiveSampler")
    ctx = _context_ids(context)
    sampler = PowerSampler(_engine_model(model), getattr(p, "tokenizer", None))
    alpha = 1.0 / float(temp)
    r = sampler.generate([ctx], alpha=alpha, max_new_tokens=int(max_new_tokens),
                         block_size=-(-int(max_new_tokens) // block_num), mcmc_steps=int(mcmc_steps),
                         proposal_temperature=float(temp), top_k=top_k, seed=seed, progress=progress, index=index,
                         mh_tries=mh_tries, entropy_eps=entropy_eps, entropy_beta=entropy_beta)[0]
    ratio = r.accepted / r.proposed if r.proposed else 0.0
    return ctx + r.token_ids, list(r.logq), [alpha * x for x in r.logp], ratio
