"""MH mixing options on a real model (issue 22): for about the same budget of sequential decode
steps, the acceptance rate and the mean alpha * log p(x) of the final samples of uniform cuts,
entropy cuts, multiple tries (k = 2, 4) and entropy + tries.

Protocol: each (variant, prompt, seed) is one call with one chain (n = 1), so the engine's decode
steps are that chain's sequential decode steps (a multiple-try step decodes its 2k - 1 rows
together). Every variant runs the same MH steps per stage: the 2k - 1 suffixes of a step share the
cut and run to the stage limit unless EOS stops one, so a step costs about the same sequential
decode steps whatever k (the measured counts are reported). Medians over prompts x seeds. alpha 4,
default tau 1/alpha (or --temperature), EOS on.

    python benchmarks/bench_mh_mixing_model.py --budget 16 --block-size 8 --steps 6 --seeds 2 --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import powersample_fast as pf  # noqa: E402
from powersample_fast.api import PowerSampler  # noqa: E402
from run_benchmarks import device_name, versions  # noqa: E402

PROMPTS = ["Explain why the sky is blue.", "What is 17 * 23? Think step by step."]
VARIANTS = [("uniform", {}), ("entropy", {"index": "entropy"}), ("tries 2", {"mh_tries": 2}),
            ("tries 4", {"mh_tries": 4}), ("entropy + tries 2", {"index": "entropy", "mh_tries": 2})]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--budget", type=int, default=16, help="max new tokens")
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6, help="MH steps per stage of the one-try variants")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=None, help="proposal temperature (default 1/alpha)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mh-mixing-model-cpu"))
    args = ap.parse_args(argv)
    cmd = "python benchmarks/bench_mh_mixing_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    model, tok = pf.load(args.model, device=args.device)
    sampler = PowerSampler(model, tok)
    alpha = 4.0
    rows = []
    for name, kw in VARIANTS:
        k = kw.get("mh_tries", 1)
        steps = args.steps
        runs = []
        for p in PROMPTS:
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                r = sampler.generate([p], alpha=alpha, max_new_tokens=args.budget, block_size=args.block_size,
                                     mcmc_steps=steps, proposal_temperature=args.temperature, seed=seed, n=1,
                                     progress=False, **kw)[0]
                runs.append(dict(prompt=p, seed=seed, wall_s=time.perf_counter() - t0,
                                 seq_steps=sampler.last_stats.get("decode_steps"),
                                 row_steps=r.stats["tokens_sampled"], accepted=r.accepted, proposed=r.proposed,
                                 alpha_logp=alpha * sum(r.logp), tokens=len(r.token_ids)))
                print(f"{name} {p[:20]!r} seed {seed}: {runs[-1]}", file=sys.stderr)
        med = lambda key: statistics.median(x[key] for x in runs)  # noqa: E731
        rows.append(dict(variant=name, mcmc_steps=steps, rows=2 * k - 1, seq_steps=med("seq_steps"),
                         row_steps=med("row_steps"), acceptance=med("accepted") / max(1, med("proposed")),
                         acc_rate_median=statistics.median(x["accepted"] / max(1, x["proposed"]) for x in runs),
                         alpha_logp=med("alpha_logp"), wall_s=med("wall_s"), runs=runs))
    tau = args.temperature if args.temperature is not None else 1 / alpha
    L = [f"# MH mixing options on {args.model} ({device_name(model.device)}, {args.threads} torch threads)", "",
         f"- command: `{cmd}`",
         f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; versions: {versions()}",
         f"- {len(PROMPTS)} chat prompts x {args.seeds} seeds, one chain per call; budget {args.budget} new tokens, "
         f"block {args.block_size}, alpha {alpha:g}, tau {tau:g}, EOS on; medians over prompts x seeds",
         "", "| variant | rows | MH steps per stage | sequential decode steps | row-steps | acceptance rate | "
         "mean alpha*log p (median) | wall s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['variant']} | {r['rows']} | {r['mcmc_steps']} | {r['seq_steps']:.0f} | {r['row_steps']:.0f} | "
                 f"{r['acc_rate_median']:.2f} | {r['alpha_logp']:.1f} | {r['wall_s']:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    out.with_suffix(".json").write_text(json.dumps(dict(command=cmd, versions=versions(), rows=rows), indent=1))
    print("\n".join(L))


if __name__ == "__main__":
    main()
