"""Methods table: plain / mh / smc / sps (block) / sps_token on the same prompts and the same token budget.

    python benchmarks/bench_methods.py                       # default model on CPU (make bench-methods-cpu)
    python benchmarks/bench_methods.py --device cuda --budget 256 --out benchmarks/results   # GPU rows
    python benchmarks/bench_methods.py --model TINY_DIR --budget 768 --name methods-tiny-768   # step counts

Protocol: each prompt is sampled once per call (n = 1: the latency one user sees; all rows of a
method decode together: N particles for smc, max(L, K*M) rows for sps, 1 + K*M for sps_token), EOS
disabled so every sample has exactly `budget` tokens, one warm-up call per method first. Each
(method, prompt) is timed `repeats` times; the table reports the median over prompts x repeats
(min-max in brackets).
Columns: wall seconds per sample; tokens decoded per sample (model positions computed in decode
steps: extensions, proposals, particles, rollouts, SPS prefix steps); tokens/s (decoded / wall);
ratio to plain (wall per sample / plain's: the papers' headline metric); sequential decode steps per
kept token (the latency on a memory-bound GPU, where a wider batch is nearly free) and row-steps per
kept token (rows computed, summed over steps: the compute), both from the engine's counters, which
do not depend on the model (EOS off), so a tiny model gives the default model's counts; held
row-steps the engine skipped per kept token (rows of the sample that a step did not compute).
Method settings are the papers' defaults except the budget (and mh's block size, budget / 2: two
stages); `sps_small` and `sps_token_small` are small CPU settings. Nothing here is a pass/fail test.
Writes `<out>/<name>.md` and `.json` (default name `methods-<cpu|gpu>`; command, device, versions).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import powersample_fast as pf  # noqa: E402
from powersample_fast.device import synchronize  # noqa: E402
from powersample_fast.api import PowerSampler  # noqa: E402
from run_benchmarks import device_name, versions  # noqa: E402

PROMPTS = ["Explain why the sky is blue.", "What is 17 * 23? Think step by step."]


def methods(budget: int) -> dict:
    a = dict(alpha=4.0)
    return {
        "plain": dict(method="plain"),
        "mh": dict(method="mh", block_size=max(1, budget // 2), mcmc_steps=10, **a),
        "smc": dict(method="smc", particles=64, ess_threshold=0.5, **a),
        "sps": dict(method="sps", block_size=192, sps_candidates=64, sps_top_k=8, sps_rollouts=8, sps_horizon=192, **a),
        "sps_small": dict(method="sps", block_size=8, sps_candidates=16, sps_top_k=2, sps_rollouts=4, sps_horizon=8,
                          **a),
        "sps_token": dict(method="sps_token", sps_top_k=8, sps_rollouts=8, sps_horizon=192, **a),
        "sps_token_small": dict(method="sps_token", sps_top_k=2, sps_rollouts=4, sps_horizon=8, **a),
    }


def describe(name: str, kw: dict, budget: int) -> str:
    if name == "plain":
        return "temperature 1"
    if name == "mh":
        return f"alpha 4, tau 1/4, block {kw['block_size']}, {kw['mcmc_steps']} MH steps"
    if name == "smc":
        return f"alpha 4, tau 1/4, N {kw['particles']}, ESS threshold {kw['ess_threshold']} (checked every token)"
    if kw["method"] == "sps":
        return (f"block level, alpha 4, B {kw['block_size']}, L {kw['sps_candidates']}, K {kw['sps_top_k']}, "
                f"M {kw['sps_rollouts']}, H {kw['sps_horizon']} (capped by the budget)")
    return (f"token level, alpha 4, K {kw['sps_top_k']}, M {kw['sps_rollouts']}, H {kw['sps_horizon']} "
            f"(capped by the budget: min(H, {budget} - t - 1))")


def run(sampler, prompt, kw, budget, seed):
    dev = sampler.model.device
    synchronize(dev)
    t = time.perf_counter()
    r = sampler.generate(prompt, n=1, max_new_tokens=budget, seed=seed, progress=False, chat=True, **kw)[0]
    synchronize(dev)
    return time.perf_counter() - t, r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--budget", type=int, default=16, help="max_new_tokens for every method")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--methods", default="plain,mh,smc,sps,sps_small,sps_token",
                    help=f"comma-separated, from {','.join(methods(16))}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--name", default=None, help="output file stem (default methods-<cpu|gpu>)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = pf.load(args.model, device=args.device, dtype=args.dtype)
    sampler = PowerSampler(model, tok, eos_token_ids=[])  # EOS off: every sample has `budget` tokens
    dev = model.device
    cfg = methods(args.budget)
    rows = []
    for name in args.methods.split(","):
        kw = cfg[name]
        sampler.max_batch = 1 + 64 * 64  # every row of one sample in one batch
        run(sampler, PROMPTS[0], kw, 4, seed=123)  # warm-up (allocator, Triton compilation)
        walls, dec, gen, steps, rsteps, skipped = [], [], [], [], [], []
        for rep in range(args.repeats):
            for i, pr in enumerate(PROMPTS):
                w, r = run(sampler, pr, kw, args.budget, seed=1000 * rep + i)
                st = sampler.last_stats  # one sample per call: the engine's counters are this sample's
                walls.append(w)
                dec.append(r.stats["tokens_decoded"])
                gen.append(len(r.token_ids))
                steps.append(st["decode_steps"] / len(r.token_ids))
                rsteps.append(st["row_steps"] / len(r.token_ids))
                skipped.append(st["row_steps_skipped"] / len(r.token_ids))
                print(f"{name:5s} rep {rep} prompt {i}: {w:.2f} s, {r.stats['tokens_decoded']} decoded, "
                      f"{st['decode_steps']} steps", flush=True)
        w = statistics.median(walls)
        d = statistics.median(dec)
        rows.append(dict(method=name, settings=describe(name, kw, args.budget), s_per_sample=w,
                         s_min=min(walls), s_max=max(walls), tokens_generated=statistics.median(gen),
                         tokens_decoded=d, tok_per_s=d / w, runs=len(walls),
                         batch_rows=sampler.last_stats["batch_slots"], steps_per_token=statistics.median(steps),
                         row_steps_per_token=statistics.median(rsteps),
                         skipped_row_steps_per_token=statistics.median(skipped)))
    plain = next((r["s_per_sample"] for r in rows if r["method"] == "plain"), None)
    for r in rows:
        r["ratio_to_plain"] = r["s_per_sample"] / plain if plain else float("nan")
    write(rows, args, dev, model)


def write(rows, args, dev, model):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = "gpu" if dev.type == "cuda" else "cpu"
    meta = {"device": device_name(dev), "dtype": str(model.dtype).replace("torch.", ""), "versions": versions(),
            "torch_threads": torch.get_num_threads(),
            "command": " ".join(["python"] + [Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "budget": args.budget,
            "prompts": PROMPTS, "repeats": args.repeats}
    name = args.name or f"methods-{kind}"
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Methods on {meta['device']} ({meta['dtype']}, {meta['torch_threads']} torch threads)", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}; versions: {meta['versions']}",
             f"- {len(PROMPTS)} chat prompts x {args.repeats} repeats, one sample per call, budget {args.budget} "
             "new tokens, EOS disabled (every sample has the full budget); medians over prompts x repeats",
             "", "| method | settings | s per sample (min-max) | tokens decoded per sample | tokens/s | "
             "ratio to plain (wall) | rows per sample | decode steps per kept token | row-steps per kept token | "
             "held row-steps skipped per kept token |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['settings']} | {r['s_per_sample']:.3g} ({r['s_min']:.3g}-{r['s_max']:.3g}) "
                     f"| {r['tokens_decoded']:.0f} | {r['tok_per_s']:.1f} | {r['ratio_to_plain']:.1f}x | "
                     f"{r['batch_rows']} | {r['steps_per_token']:.3g} | {r['row_steps_per_token']:.3g} | "
                     f"{r['skipped_row_steps_per_token']:.3g} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
