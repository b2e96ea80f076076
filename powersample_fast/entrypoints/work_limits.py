"""Bounds on the work one call plans, checked before anything is allocated (`check_work`).

One call is one `PowerSampler.generate`, one `powersample-fast sample`, or one line of `run`:
- memory (always): every chain's bookkeeping is allocated when its request is added, a few hundred
  bytes per chain and per decode row (measured: ~560 + ~260 per row). A call whose chains alone need
  more than the memory available now (RAM + swap, within the cgroup's limit) is refused: that is a
  lower bound, so no override; lower n or split the prompts.
- work (overridable): the planned decode tokens, chains x the method's planned tokens per chain (the
  progress bar's plan: for mh, N proposals per stage of mean length (L_k + 1) / 2, on 2k - 1 rows
  with mh_tries=k), above
  MAX_PLANNED_TOKENS (1e9, about two days at 6000 tokens/s) are refused unless allow_long=True
  (CLI: --allow-long). n=1e9 or mcmc_steps=1e9 end here in microseconds instead of allocating until
  killed or running for years.
No torch: the CLI checks this before it imports anything heavy.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

MAX_PLANNED_TOKENS = 10 ** 9
CHAIN_BYTES, ROW_BYTES = 512, 256  # lower bounds of the measured ~560 per chain and ~260 per decode row


def decode_rows(p) -> int:
    """Decode rows per sample, as the policies' rows(p)[0] (mh: 2k - 1 for mh_tries=k; smc: N particles;
    sps: max(L, K*M), or L when no block can have rollouts; sps_token: 1 + K*M)."""
    if p.method == "sps":
        rolls = p.sps_horizon > 0 and p.max_new_tokens > p.block_size
        return max(p.sps_candidates, p.sps_top_k * p.sps_rollouts) if rolls else p.sps_candidates
    return {"mh": 2 * p.mh_tries - 1, "smc": p.particles, "sps_token": 1 + p.sps_top_k * p.sps_rollouts}.get(p.method, 1)


def planned_tokens_per_chain(p) -> float:
    """The policies' planned_tokens(p) in closed form (mh's sums over up to T stages, here O(1))."""
    T, B = p.max_new_tokens, p.block_size
    if p.method == "mh":
        K = -(-T // B)
        lengths = T if p.index == "last_block" else B * K * (K - 1) / 2 + T  # sum of L_k - lo_k over stages
        return T + p.mcmc_steps * (2 * p.mh_tries - 1) * (lengths + K) / 2  # 2k - 1 rows per proposal
    if p.method == "smc":
        return float(p.particles * T)
    if p.method == "sps":  # L*T candidate tokens; after block i (of K), K*M rollouts of min(H, T - i*B)
        return float(p.sps_candidates * T + p.sps_top_k * p.sps_rollouts * _sps_rollout_length(p))
    if p.method == "sps_token":
        return float(T * (1 + p.sps_top_k * p.sps_rollouts * min(p.sps_horizon, (T - 1) / 2)))
    return float(T)


def _sps_rollout_length(p) -> int:
    """Block SPS: the summed rollout length min(H, T - i*B) over the blocks i = 1..K-1 with a future."""
    T, B, H = p.max_new_tokens, p.block_size, p.sps_horizon
    K = -(-T // B)
    c = min(max((T - H) // B, 0), K - 1)  # blocks i = 1..c leave >= H tokens: full rollouts
    return c * H + (K - 1 - c) * T - B * ((K - 1) * K - c * (c + 1)) // 2


def sequential_steps_per_chain(p) -> float:
    """Decode steps one sample takes if no row stops at EOS, its `decode_rows` rows decoding together
    in each step (the latency; planned tokens / steps is the rows a step averages): plain and smc T;
    mh its planned tokens with one try (the 2k - 1 rows of a proposal step decode together); block
    sps T + the rollouts' lengths; sps_token 1 + min(H, tokens left after it) per token."""
    T = p.max_new_tokens
    if p.method == "mh":
        return planned_tokens_per_chain(dataclasses.replace(p, mh_tries=1))
    if p.method == "sps":
        return float(T + _sps_rollout_length(p))
    if p.method == "sps_token":  # token t: 1 + min(H, T - 1 - t) steps
        H = p.sps_horizon
        return float(T + (T * (T - 1) // 2 if T <= H else H * (H - 1) // 2 + H * (T - H)))
    return float(T)


def step_rows(p, n_chains: int, max_batch: int) -> tuple:
    """(decode rows of a step, samples decoded together) as PowerSampler.generate sizes its engine:
    whole samples of `decode_rows` rows, at least one."""
    n_rows = decode_rows(p)
    rows = n_rows * max(1, min(max_batch, n_chains * n_rows) // n_rows)
    return rows, rows // n_rows


def _read_int(path: str, key: Optional[str] = None) -> Optional[int]:
    try:
        text = Path(path).read_text()
    except (OSError, ValueError):
        return None
    if key is None:
        return int(text) if text.strip().isdigit() else None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB
    return None


def available_memory() -> Optional[int]:
    """Bytes this process could still allocate: MemAvailable + SwapFree, within a cgroup limit;
    None where that cannot be read (not Linux)."""
    avail, swap = _read_int("/proc/meminfo", "MemAvailable"), _read_int("/proc/meminfo", "SwapFree")
    out = None if avail is None else avail + (swap or 0)
    for limit, used in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, cur = _read_int(limit), _read_int(used)
        if lim is not None and cur is not None and lim < 1 << 60:
            out = lim - cur if out is None else min(out, lim - cur)
    return out


def _gb(b: float) -> str:
    return f"{b / 2 ** 30:.3g} GiB"


def check_work(p, n_prompts: int, *, allow_long: bool = False, override: str = "allow_long=True") -> float:
    """ConfigError (one line: the figure, the limit, the fix) if `n_prompts` prompts x `p` cannot fit
    memory or plan more than MAX_PLANNED_TOKENS decode tokens (unless allow_long). Returns the planned
    decode tokens. `override` names the way to pass allow_long where the caller is (e.g. --allow-long)."""
    chains = n_prompts * p.n
    s = "s" if chains == 1 else ""  # verb ending: "1 chain needs", "2 chains need"
    what = f"{chains:,} chain{'' if s else 's'} ({n_prompts:,} prompt{'s' if n_prompts != 1 else ''} x n={p.n:,})"
    need, avail = chains * (CHAIN_BYTES + ROW_BYTES * decode_rows(p)), available_memory()
    if avail is not None and need > avail:
        raise ConfigError(f"{what} need{s} at least {_gb(need)} of memory before sampling starts, more than the "
                          f"{_gb(avail)} available; lower n" + (" (or split the prompts over several calls)"
                                                                 if n_prompts > 1 else ""))
    per = planned_tokens_per_chain(p)
    tokens = chains * per
    if tokens > MAX_PLANNED_TOKENS and not allow_long:
        steps = f", mcmc_steps={p.mcmc_steps:,}" if p.method == "mh" else ""
        raise ConfigError(f"{what} plan{s} {tokens:.3g} decode tokens ({per:.3g} per chain: max_new_tokens="
                          f"{p.max_new_tokens:,}{steps}), over the limit of {MAX_PLANNED_TOKENS:.0e}; lower n, "
                          f"mcmc_steps or max_new_tokens, or pass {override} to run it anyway")
    return tokens
