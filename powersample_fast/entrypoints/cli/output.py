"""What the CLI prints: the start-up line (what runs, roughly how long), the samples (text or JSON
lines) and the stats (text on stderr, or with --json one final JSON line on stdout)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from typing import Optional

from ...sampling_params import SamplingParams


def expected_decode_steps(p: SamplingParams, n_chains: int, max_batch: int) -> int:
    """Decode steps of a run if no chain stops at EOS: each sample's sequential steps (its rows decode
    together: smc's particles, sps's candidates and rollouts, mh's tries), samples decoded as many
    at a time as max_batch rows hold (`work_limits.step_rows`)."""
    from ..work_limits import sequential_steps_per_chain, step_rows

    together = step_rows(p, n_chains, max_batch)[1]
    return int(round(sequential_steps_per_chain(p) * -(-n_chains // together)))


MAX_EXPECTED_HOURS = 24  # `sample` refuses a run expected to take longer, unless --allow-long


def check_expected_time(p: SamplingParams, n_chains: int, max_batch: int, step_s: float, allow_long: bool) -> None:
    """ConfigError when the start-up line's estimate is over MAX_EXPECTED_HOURS (and not allow_long)."""
    steps = expected_decode_steps(p, n_chains, max_batch)
    if steps * step_s > MAX_EXPECTED_HOURS * 3600 and not allow_long:
        from ...errors import ConfigError

        raise ConfigError(f"expected run time ~{_fmt_s(steps * step_s)} ({steps:,} decode steps at "
                          f"{step_s * 1e3:.0f} ms) is over the limit of {MAX_EXPECTED_HOURS} h; lower --n, --steps "
                          "or --max-new-tokens, or pass --allow-long to run it anyway")


def time_decode_step(model, rows: int) -> float:
    """Seconds of one forward of `rows` single-token rows (~ one decode step), after one warm-up; one
    row as a one-row engine runs it (its gemv, cpu_linear.one_row_engine)."""
    import contextlib

    import torch

    from ...device import synchronize
    from ...models import cpu_linear

    ids = torch.zeros(rows, 1, dtype=torch.long, device=model.device)
    with torch.inference_mode(), (cpu_linear.one_row_engine() if rows == 1 else contextlib.nullcontext()):
        model(ids)
        synchronize(model.device)
        t = time.perf_counter()
        model(ids)
        synchronize(model.device)
    return time.perf_counter() - t


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 3 * 3600 else f"{s / 3600:,.1f} h"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def announce(model_name: str, p: SamplingParams, n_prompts: int, chat: bool, device, dtype, threads,
             max_batch: int, step_s: float) -> str:
    """One line: model, method, chains, budget, where it runs, and the expected time."""
    from ..work_limits import step_rows

    chains = n_prompts * p.n
    steps = expected_decode_steps(p, chains, max_batch)
    together = step_rows(p, chains, max_batch)[1]
    if p.method == "mh":
        mixing = (", entropy cuts" if p.index == "entropy" else "") + (f", {p.mh_tries} tries" if p.mh_tries > 1 else "")
        method = f"power sampling (Metropolis-Hastings, alpha {p.alpha:g}, tau {p.tau:.3g}{mixing})"
        budget = f"block {p.block_size}, {p.mcmc_steps} MH steps per block"
    elif p.method == "smc":  # particles propose from softmax(z / tau)
        method = f"Power-SMC (alpha {p.alpha:g}, {p.particles} particles, tau {p.tau:.3g})"
        budget = f"resampling when ESS < {p.ess_threshold:g} N"
    elif p.method in ("sps", "sps_token"):  # candidates and rollouts sample from p (temperature 1)
        block = f"blocks of {p.block_size}, {p.sps_candidates} candidates, " if p.method == "sps" else "per token, "
        method = (f"Scalable Power Sampling ({'block' if p.method == 'sps' else 'token'} level, alpha {p.alpha:g}, "
                  f"{block}top {p.sps_top_k} x {p.sps_rollouts} rollouts of <= {p.sps_horizon} tokens)")
        budget = "no MCMC"
    else:
        method, budget = f"{p.method} sampling (temperature {p.tau:.3g})", "no MCMC"
    thr = f", {_plural(threads, 'thread')}" if threads else ""
    return (f"powersample-fast: {model_name}, {method}, {_plural(n_prompts, 'prompt')} x {p.n} = "
            f"{_plural(chains, 'chain')} ({together} at a time), up to {p.max_new_tokens} new tokens "
            f"({budget}), chat template {'on' if chat else 'off'}, {device}/{str(dtype).replace('torch.', '')}{thr}; "
            f"expected ~{_fmt_s(steps * step_s)} ({steps} decode steps at {step_s * 1e3:.0f} ms; less when "
            "chains stop at EOS)")


def run_info(args, p: SamplingParams, chat: bool, model_dir, device, dtype) -> dict:
    """The fields every --json sample line carries besides the result: the run's inputs."""
    d = asdict(p)
    d["proposal_temperature"] = p.tau  # the value used (the default is 1/alpha)
    return dict(model=args.model, model_dir=str(model_dir), chat=chat, device=str(device),
                dtype=str(dtype).replace("torch.", ""), **d)


def method_note(r) -> str:
    """The method's own figures for a result's header line."""
    e = r.extra
    if r.method == "smc":
        return f"log-evidence {e['log_evidence']:.3f}, {e['resampling_events']} resampling events"
    if r.method in ("sps", "sps_token"):
        return f"{e['rollout_tokens']} rollout tokens"
    return f"accepted {r.accepted}/{r.proposed}"


def print_results(results, args, info: Optional[dict]) -> None:
    for r in results:
        if args.json:
            row = dict(prompt=args.prompt[r.prompt_index], **info)
            row.update(r.to_dict())
            print(json.dumps(row))
        else:
            print(f"--- prompt {r.prompt_index} sample {r.sample_index}: {len(r.token_ids)} tokens, "
                  f"{method_note(r)}, {'EOS' if r.finished_by_eos else 'budget'} ---")
            print(r.text)


def print_stats(stats: dict, as_json: bool) -> None:
    """With --json: one last stdout line {"stats": {...}}; else `k=v` text on stderr."""
    if as_json:
        print(json.dumps({"stats": stats}))
    else:
        print("stats: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in stats.items()), file=sys.stderr)


def write_profile(prof, path: str) -> None:
    """Export the trace (after the samples are printed, so a failure loses nothing else) and check
    the file is there: the profiler reports some write errors by printing them, not by raising."""
    import os

    from ...errors import ConfigError

    try:
        if os.path.isfile(path):
            os.remove(path)  # so an old trace cannot pass for this run's
        prof.export_chrome_trace(path)
    except OSError as e:
        raise ConfigError(f"cannot write the profile trace {path}: {e}") from None
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise ConfigError(f"the profile trace {path} was not written (see the profiler's message above)")
    print(f"powersample-fast: profile trace written to {path}", file=sys.stderr)


def stderr_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_label(model_arg: str, model_dir) -> str:
    from ...models.default_model import MODEL_NAME

    return f"default ({MODEL_NAME})" if model_arg == "default" else str(model_dir)

