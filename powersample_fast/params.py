"""Validation of sampling arguments, shared by PowerSampler and the naive baseline."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from .errors import ConfigError

INDEX_MODES = ("uniform", "last_block")
METHODS = ("plain", "mh", "smc", "sps")  # sampling policies (powersample_fast/policies)

Prompt = Union[str, Sequence[int]]


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
    K most likely tokens, `sps_rollouts` M rollouts of at most `sps_horizon` H tokens from p each."""

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

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.early_stop, bool):
            raise ConfigError(f"early_stop must be True or False (got {self.early_stop!r})")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"alpha must be a finite number > 0 (got {self.alpha!r}); the paper uses 4.0")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1 (got {self.max_new_tokens!r})")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ConfigError(f"block_size must be an integer >= 1 (got {self.block_size!r}); the paper uses 192")
        if not isinstance(self.mcmc_steps, int) or self.mcmc_steps < 0:
            raise ConfigError(f"mcmc_steps must be an integer >= 0 (got {self.mcmc_steps!r})")
        t = self.proposal_temperature
        if t is not None and not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
            raise ConfigError(f"proposal_temperature must be > 0 or None for 1/alpha (got {t!r})")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"top_k must be an integer >= 1 or None to disable (got {self.top_k!r})")
        if self.index not in INDEX_MODES:
            raise ConfigError(f"unknown index mode {self.index!r}; choose one of {', '.join(INDEX_MODES)}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"n (samples per prompt) must be an integer >= 1 (got {self.n!r})")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int or None (got {self.seed!r})")
        self._check_smc_sps()

    def _check_smc_sps(self):
        def whole(name, v, lo, what):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"{name} ({what}) must be an integer >= {lo} (got {v!r})")

        whole("particles", self.particles, 1, "N, smc particles per sample")
        e = self.ess_threshold
        if isinstance(e, bool) or not (isinstance(e, (int, float)) and 0.0 < e <= 1.0):
            raise ConfigError(f"ess_threshold must be in (0, 1] (got {e!r}); resampling happens when "
                              "ESS < ess_threshold * particles, 0.5 is the paper's value")
        whole("resample_every", self.resample_every, 1, "smc ESS check interval in tokens")
        whole("alpha_ramp_tokens", self.alpha_ramp_tokens, 0, "smc exponent ramp length, 0 = off")
        if not isinstance(self.return_all, bool):
            raise ConfigError(f"return_all must be True or False (got {self.return_all!r})")
        whole("sps_top_k", self.sps_top_k, 1, "K, sps candidates per token")
        whole("sps_rollouts", self.sps_rollouts, 1, "M, sps rollouts per candidate")
        whole("sps_horizon", self.sps_horizon, 0, "H, sps rollout length")
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


def normalize_prompts(prompts, tokenizer, chat: bool = False) -> List[List[int]]:
    """str | list[str] | list[int] | list[list[int]] -> list of token-id lists (validated)."""
    if hasattr(prompts, "tolist") and not isinstance(prompts, (list, tuple, str)):  # torch / numpy ids
        prompts = prompts.tolist()
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(x, int) for x in prompts):
        prompts = [list(prompts)]
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ConfigError("prompts must be a string, a list of strings, or lists of token ids (got an empty input)")
    out: List[List[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if p == "":
                raise ConfigError(f"prompt {i} is empty; give at least one character or token")
            if tokenizer is None:
                raise ConfigError("a tokenizer is needed to encode text prompts; pass token ids instead")
            if chat:
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
                )
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                ids = list(ids)
            else:
                ids = tokenizer.encode(p, add_special_tokens=True) if tokenizer is not None else []
            out.append([int(x) for x in ids])
        elif isinstance(p, (list, tuple)) and all(isinstance(x, int) for x in p):
            if len(p) == 0:
                raise ConfigError(f"prompt {i} is an empty token list; give at least one token")
            out.append([int(x) for x in p])
        else:
            raise ConfigError(f"prompt {i} must be a string or a list of token ids (got {type(p).__name__})")
        if len(out[-1]) == 0:
            raise ConfigError(f"prompt {i} encodes to zero tokens")
    return out
