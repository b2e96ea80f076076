"""Validation of sampling arguments, shared by PowerSampler and the naive baseline."""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from .errors import ConfigError

INDEX_MODES = ("uniform", "last_block")
METHODS = ("plain", "mh", "smc", "sps")  # sampling policies (powersample_fast/policies)

Prompt = Union[str, Sequence[int]]


def _is_bool(x) -> bool:
    """Python, numpy and torch booleans (which are ints to Python but never a count or a rate)."""
    return isinstance(x, bool) or str(getattr(x, "dtype", "")) in ("bool", "torch.bool")


def as_int(x) -> Optional[int]:
    """int(x) for an integer of any kind (int, numpy integer, 0-d integer tensor: anything with
    __index__), None for everything else, bools included."""
    if _is_bool(x):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def as_real(x) -> Optional[float]:
    """float(x) for a real number (int, float, numpy scalar), None for everything else, bools included."""
    if _is_bool(x):
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    i = as_int(x)
    return None if i is None else float(i)


@dataclass(frozen=True)
class SamplingParams:
    """What to sample. method: "mh" (Algorithm 1, exact p^alpha) or "plain" (ancestral sampling at
    `proposal_temperature`, default 1, the baseline). early_stop: the paper's rule (a chain whose
    state ends with EOS before the last stage stops there; cheaper, not exact); the default jumps
    to the final stage's MH steps instead (ALGORITHM.md step 3).

    method="smc" (Power-SMC, policies/smc.py): `particles` N decode from softmax(z/tau); resample
    (systematic) when ESS < ess_threshold * N, checked every `resample_every` tokens;
    `alpha_ramp_tokens` > 0 ramps the exponent from 1 to alpha over that many tokens (the final
    target stays p^alpha); `return_all` adds every particle and its normalised weight to `extra`.
    method="sps" (Scalable Power Sampling, token level, policies/sps.py): per token the `sps_top_k`
    K most likely tokens, `sps_rollouts` M rollouts of at most `sps_horizon` H tokens from p each.

    Numbers may be any real/integer type (numpy scalars included) and are stored as Python
    float/int; bools are rejected."""

    method: str = "mh"
    alpha: float = 4.0
    max_new_tokens: int = 3072
    block_size: int = 192
    mcmc_steps: int = 10
    proposal_temperature: Optional[float] = None  # None -> 1/alpha
    top_k: Optional[int] = None
    index: str = "uniform"
    n: int = 1
    seed: Optional[int] = None
    early_stop: bool = False
    particles: int = 64                # smc: N
    ess_threshold: float = 0.5         # smc: resample when ESS < ess_threshold * N
    resample_every: int = 1            # smc: ESS check interval in tokens
    alpha_ramp_tokens: int = 0         # smc: exponent bridging from 1 to alpha over this many tokens (0: off)
    return_all: bool = False           # smc: all particles + normalised weights in extra
    sps_top_k: int = 8                 # sps: K candidates per token
    sps_rollouts: int = 8              # sps: M rollouts per candidate
    sps_horizon: int = 192             # sps: H tokens per rollout (at most; EOS and the budget end it)

    def _set(self, name, value):
        object.__setattr__(self, name, value)  # frozen: normalise numpy scalars to Python numbers once

    def _int(self, name, lo, label=None, hint="", optional=""):
        v = getattr(self, name)
        if optional and v is None:
            return
        i = as_int(v)
        if i is None or i < lo:
            raise ConfigError(f"{label or name} must be an integer >= {lo}{optional} (got {v!r}){hint}")
        self._set(name, i)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.early_stop, bool):
            raise ConfigError(f"early_stop must be True or False (got {self.early_stop!r})")
        a = as_real(self.alpha)
        if a is None or not math.isfinite(a) or a <= 0:
            raise ConfigError(f"alpha must be a finite number > 0 (got {self.alpha!r}); the paper uses 4.0")
        self._set("alpha", a)
        self._int("max_new_tokens", 1)
        self._int("block_size", 1, hint="; the paper uses 192")
        self._int("mcmc_steps", 0)
        t = self.proposal_temperature
        if t is not None:
            tf = as_real(t)
            if tf is None or not math.isfinite(tf) or tf <= 0:
                raise ConfigError(f"proposal_temperature must be > 0 or None for 1/alpha (got {t!r})")
            self._set("proposal_temperature", tf)
        self._int("top_k", 1, optional=" or None to disable")
        if self.index not in INDEX_MODES:
            raise ConfigError(f"unknown index mode {self.index!r}; choose one of {', '.join(INDEX_MODES)}")
        self._int("n", 1, label="n (samples per prompt)")
        if self.seed is not None:
            if as_int(self.seed) is None:
                raise ConfigError(f"seed must be an int or None (got {self.seed!r})")
            self._set("seed", as_int(self.seed))
        self._check_smc_sps()

    def _check_smc_sps(self):
        def whole(name, lo, what):
            self._int(name, lo, label=f"{name} ({what})")

        whole("particles", 1, "N, smc particles per sample")
        e = as_real(self.ess_threshold)
        if e is None or not 0.0 < e <= 1.0:
            raise ConfigError(f"ess_threshold must be in (0, 1] (got {self.ess_threshold!r}); resampling happens "
                              "when ESS < ess_threshold * particles, 0.5 is the paper's value")
        self._set("ess_threshold", e)
        whole("resample_every", 1, "smc ESS check interval in tokens")
        whole("alpha_ramp_tokens", 0, "smc exponent ramp length, 0 = off")
        if not isinstance(self.return_all, bool):
            raise ConfigError(f"return_all must be True or False (got {self.return_all!r})")
        whole("sps_top_k", 1, "K, sps candidates per token")
        whole("sps_rollouts", 1, "M, sps rollouts per candidate")
        whole("sps_horizon", 0, "H, sps rollout length")
        if self.method == "sps" and self.top_k is not None:
            raise ConfigError(f"top_k does not apply to method 'sps' (got top_k={self.top_k}); its candidates are "
                              "the sps_top_k most likely tokens and its rollouts sample from p")

    @property
    def tau(self) -> float:
        """Sampling temperature of the proposal (mh: default 1/alpha) or of plain sampling (default 1)."""
        if self.proposal_temperature is not None:
            return float(self.proposal_temperature)
        return 1.0 if self.method == "plain" else 1.0 / self.alpha

    @property
    def num_blocks(self) -> int:
        return -(-self.max_new_tokens // self.block_size)

    def stage_limit(self, k: int) -> int:
        """L_k for stage k = 1..K."""
        return min(k * self.block_size, self.max_new_tokens)


def merge_eos_ids(*sources) -> Tuple[int, ...]:
    """EOS ids from several sources (each None, an int, or a list of ints), deduplicated in order."""
    out: List[int] = []
    for src in sources:
        for e in ([] if src is None else [src] if isinstance(src, int) else list(src)):
            if e is not None and int(e) not in out:
                out.append(int(e))
    return tuple(out)


def resolve_seed(seed: Optional[int]) -> int:
    """The call's base seed: ``seed`` itself, or a fresh random one when None."""
    import random

    return random.SystemRandom().getrandbits(63) if seed is None else int(seed)


def chain_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """32-bit seed of one chain: a pure function of (call seed, prompt, sample), so a chain's
    output does not depend on which other chains share its batch."""
    import hashlib

    h = hashlib.blake2b(f"{base_seed}:{prompt_index}:{sample_index}".encode(), digest_size=4)
    return int.from_bytes(h.digest(), "little")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat(tokenizer, chat: Optional[bool]) -> bool:
    """Whether text prompts go through the chat template: `chat` itself, or for None ("auto") whether
    the tokenizer has a template. chat=True without a template is an error."""
    if chat is None:
        return has_chat_template(tokenizer)
    if chat and tokenizer is not None and not has_chat_template(tokenizer):
        raise ConfigError("chat=True but the tokenizer has no chat template; pass chat=False (CLI: --no-chat)")
    return bool(chat)


def _describe(x) -> str:
    """Type of a prompt input for error messages, with shape and dtype for arrays and tensors."""
    name = f"{type(x).__module__.split('.')[0]}.{type(x).__name__}" if hasattr(x, "shape") else type(x).__name__
    if hasattr(x, "shape"):
        return f"{name} of shape {tuple(x.shape)}, dtype {x.dtype}"
    if isinstance(x, (list, tuple)):
        bad = next((e for e in x if as_int(e) is None), None)
        return f"{name} containing {type(bad).__name__} {bad!r}" if x and bad is not None else name
    return name


def _array_ids(x, what: str):
    """A torch tensor / numpy array of token ids -> list (1-D) or list of lists (2-D); else an error."""
    dtype = str(x.dtype)
    integer = getattr(x.dtype, "kind", None) in ("i", "u") or (
        dtype.startswith("torch.") and not x.dtype.is_floating_point and not x.dtype.is_complex
        and dtype != "torch.bool")
    if not integer or len(x.shape) not in (1, 2):
        raise ConfigError(f"{what} must be token ids as a 1-D or 2-D integer tensor/array "
                          f"(got {_describe(x)})")
    return x.tolist()


def _ids(p) -> Optional[List[int]]:
    """A list of token ids (ints of any kind, no bools), or None if `p` is not one."""
    if not isinstance(p, (list, tuple)):
        return None
    ids = [as_int(x) for x in p]
    return None if any(i is None for i in ids) else ids


def normalize_prompts(prompts, tokenizer, chat: Optional[bool] = None) -> List[List[int]]:
    """str | list[str] | list[int] | list[list[int]] | 1-D/2-D integer tensor or array -> list of
    token-id lists (validated). chat: apply the tokenizer's chat template to text prompts; None
    (default) = when the tokenizer has one (see `use_chat`)."""
    if hasattr(prompts, "shape") and hasattr(prompts, "tolist"):  # torch / numpy ids
        prompts = _array_ids(prompts, "prompts")
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, (list, tuple)) and prompts and not any(
            isinstance(x, (str, list, tuple)) or getattr(x, "ndim", 0) > 0 for x in prompts):
        if _ids(prompts) is None:  # a flat sequence of scalars: one prompt of token ids
            raise ConfigError("token ids must be integers; a prompt must be a string or a list of token ids "
                              f"(got {_describe(prompts)})")
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        got = "an empty input" if isinstance(prompts, (list, tuple)) else _describe(prompts)
        raise ConfigError(f"prompts must be a string, a list of strings, or lists of token ids (got {got})")
    chat_on = None
    out: List[List[int]] = []
    for i, p in enumerate(prompts):
        if hasattr(p, "shape") and hasattr(p, "tolist"):
            p = _array_ids(p, f"prompt {i}")
            if p and isinstance(p[0], list):
                raise ConfigError(f"prompt {i} must be a 1-D sequence of token ids (got a 2-D tensor/array)")
        if isinstance(p, str):
            if p == "":
                raise ConfigError(f"prompt {i} is empty; give at least one character or token")
            if tokenizer is None:
                raise ConfigError("a tokenizer is needed to encode text prompts; pass token ids instead")
            if chat_on is None:
                chat_on = use_chat(tokenizer, chat)
            if chat_on:
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
                )
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                ids = list(ids)
            else:
                ids = tokenizer.encode(p, add_special_tokens=True)
            out.append([int(x) for x in ids])
        elif _ids(p) is not None:
            if len(p) == 0:
                raise ConfigError(f"prompt {i} is an empty token list; give at least one token")
            out.append(_ids(p))
        else:
            raise ConfigError(f"prompt {i} must be a string or a list of token ids (got {_describe(p)})")
        if len(out[-1]) == 0:
            raise ConfigError(f"prompt {i} encodes to zero tokens")
    return out
