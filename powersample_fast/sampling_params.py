"""`SamplingParams`: what to sample (method, alpha, budget, each method's parameters), validated once,
and the seeds of a call and of each chain (the numeric coercions and the text check its checks use
are in coercions.py)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

from .coercions import as_int, as_real, check_text  # noqa: F401  (re-exported)
from .errors import ConfigError

INDEX_MODES = ("uniform", "last_block", "entropy")
METHODS = ("plain", "mh", "smc", "sps", "sps_token")  # sampling policies (powersample_fast/engine/policies)


# Bounds that keep logits / temperature and alpha * log p finite in fp32 (logits reach ~1e4 in
# magnitude; fp32 overflows at 3.4e38): out-of-range values are a ConfigError, never NaN logits.
MIN_TEMPERATURE = 1e-6
MAX_ALPHA = 1e6
MAX_TRIES = 64  # mh_tries: 2k - 1 decode rows per chain
MAX_LOGPROBS = 20  # most likely tokens returned per position (OpenAI's limit)


@dataclass(frozen=True)
class SamplingParams:
    """What to sample. method: "mh" (Algorithm 1, exact p^alpha) or "plain" (ancestral sampling at
    `proposal_temperature`, default 1, the baseline). early_stop: the paper's rule (a chain whose
    state ends with EOS before the last stage stops there; cheaper, not exact); the default jumps
    to the final stage's MH steps instead (ALGORITHM.md step 3).

    method="smc" (Power-SMC, engine/policies/smc.py): `particles` N decode from softmax(z/tau); resample
    (systematic) when ESS < ess_threshold * N, checked every `resample_every` tokens;
    `alpha_ramp_tokens` > 0 ramps the exponent from 1 to alpha over that many tokens (the final
    target stays p^alpha); `return_all` adds every particle and its normalised weight to `extra`.
    method="sps" (Scalable Power Sampling, block level, engine/policies/sps_block.py): per block of
    `block_size` B tokens, `sps_candidates` L blocks sampled from p, the `sps_top_k` K most likely
    distinct ones, `sps_rollouts` M rollouts of at most `sps_horizon` H tokens from p after each.
    method="sps_token" (token level, engine/policies/sps_token.py): per token the K most likely tokens, M rollouts
    of at most H tokens each (L and B unused).

    method="mh" mixing options (issue 22, ALGORITHM.md "Faster mixing"): index="entropy" draws the
    cut m with probability g(h_m) / W(x), h_m the entropy of the base conditional at position m,
    g(h) = entropy_eps + h ** entropy_beta (> 0 everywhere), W(x) = sum of g over the generated
    positions, and adds log W(x) - log W(x') to the acceptance (exact). mh_tries=k > 1: multiple-try
    Metropolis, k proposals from the same cut plus k - 1 reference draws, decoded together on
    2k - 1 rows; k = 1 is Algorithm 1 exactly.
    Outputs and stopping (every method): `stop` strings (plain stops at one; the samplers treat one
    like EOS, ALGORITHM.md "Stop strings"; needs the engine's tokenizer), `logprobs` N (each result's
    `token_logprobs` / `top_logprobs`: base-model log-probs at temperature 1 and the N most likely
    tokens per position), `prompt_logprobs` N (the prompt's, from a prefill that keeps every
    position's logits: `RequestOutput.prompt_logprobs`). `top_p`: nucleus sampling, plain only.

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
    sps_top_k: int = 8                 # sps: K candidates (distinct blocks; sps_token: tokens) with rollouts
    sps_rollouts: int = 8              # sps: M rollouts per candidate
    sps_horizon: int = 192             # sps: H tokens per rollout (at most; EOS and the budget end it)
    sps_candidates: int = 64           # sps (block level): L candidate blocks sampled per block
    top_p: Optional[float] = None      # plain: nucleus sampling (ALGORITHM.md "top_p"); power samplers refuse it
    stop: Tuple[str, ...] = ()         # stop strings: plain stops at one, samplers treat one like EOS (ALGORITHM.md)
    logprobs: Optional[int] = None     # per generated token: its log p and the N most likely tokens' (0..20)
    prompt_logprobs: Optional[int] = None  # per prompt token likewise, from the prefill (0..20)
    mh_tries: int = 1                  # mh: k proposals per MH step (multiple-try Metropolis; 1 = Algorithm 1)
    entropy_eps: float = 0.1           # mh, index="entropy": cut weight g(h) = entropy_eps + h ** entropy_beta
    entropy_beta: float = 1.0

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
        if a is None or not math.isfinite(a) or a <= 0 or a > MAX_ALPHA:
            raise ConfigError(f"alpha must be a finite number > 0 (got {self.alpha!r}) and at most {MAX_ALPHA:g} "
                              "(larger values overflow the scaled log-probs); the paper uses 4.0")
        self._set("alpha", a)
        self._int("max_new_tokens", 1)
        self._int("block_size", 1, hint="; the paper uses 192")
        self._int("mcmc_steps", 0)
        t = self.proposal_temperature
        if t is not None:
            tf = as_real(t)
            if tf is None or not math.isfinite(tf) or tf < MIN_TEMPERATURE:
                raise ConfigError(f"proposal_temperature must be > 0 (at least {MIN_TEMPERATURE:g}) or None for 1/alpha "
                                  f"(got {t!r}); smaller values overflow logits / temperature in fp32, and "
                                  "1e-3 is already greedy in practice")
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
        self._check_mixing()
        self._check_outputs()

    def _check_mixing(self):
        self._int("mh_tries", 1, label="mh_tries (k, MH proposals per step; 1 = Algorithm 1)")
        if self.mh_tries > 1 and self.method != "mh":
            raise ConfigError(f"mh_tries={self.mh_tries} applies to method 'mh' only (got method {self.method!r})")
        if self.mh_tries > MAX_TRIES:
            raise ConfigError(f"mh_tries must be at most {MAX_TRIES} (got {self.mh_tries}); a chain decodes "
                              f"2 * mh_tries - 1 rows per MH step")
        for name, hi, why in (("entropy_eps", 1e6, "eps > 0 keeps every cut possible"),
                              ("entropy_beta", 16.0, "for constant weights use index='uniform'")):
            v = as_real(getattr(self, name))
            if v is None or not math.isfinite(v) or v <= 0 or v > hi:
                raise ConfigError(f"{name} must be a number > 0 and at most {hi:g} (got {getattr(self, name)!r}): the "
                                  f"entropy cut weight is g(h) = entropy_eps + h ** entropy_beta ({why})")
            self._set(name, v)

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
        whole("sps_top_k", 1, "K, sps candidates per block or token")
        whole("sps_rollouts", 1, "M, sps rollouts per candidate")
        whole("sps_horizon", 0, "H, sps rollout length")
        whole("sps_candidates", 1, "L, sps candidate blocks per block")
        if self.method in ("sps", "sps_token") and self.top_k is not None:
            raise ConfigError(f"top_k does not apply to method {self.method!r} (got top_k={self.top_k}); its "
                              "candidates are the sps_top_k most likely tokens or blocks and it samples from p")
        if self.method == "sps" and self.sps_top_k > self.sps_candidates:
            raise ConfigError(f"sps_top_k (K = {self.sps_top_k}) must be at most sps_candidates (L = "
                              f"{self.sps_candidates}): the K blocks that get rollouts are chosen among the L "
                              "sampled candidates; lower sps_top_k or raise sps_candidates")

    def _check_outputs(self):
        """top_p, stop, logprobs, prompt_logprobs (see the README's serving section)."""
        if self.top_p is not None:
            tp = as_real(self.top_p)
            if tp is None or not 0.0 < tp <= 1.0:
                raise ConfigError(f"top_p must be in (0, 1] or None (got {self.top_p!r})")
            self._set("top_p", None if tp == 1.0 else tp)
        if self.top_p is not None and self.method != "plain":
            raise ConfigError(f"top_p applies to method 'plain' only (got top_p={self.top_p} with method "
                              f"{self.method!r}): a nucleus proposal would restrict the target p^alpha to the paths "
                              "inside every position's nucleus of the proposal, which depends on its temperature; "
                              "use top_k for a truncated proposal")
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) and x for x in stop):
            raise ConfigError(f"stop must be a non-empty string or a list of them (got {self.stop!r})")
        for x in stop:
            check_text(x, "a stop string")
        self._set("stop", tuple(stop))
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                i = as_int(v)
                if i is None or not 0 <= i <= MAX_LOGPROBS:
                    raise ConfigError(f"{name} must be an integer in 0..{MAX_LOGPROBS} or None (got {v!r})")
                self._set(name, i)

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
