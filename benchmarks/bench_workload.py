"""A MATH500-shaped workload (issue 12, item 4), and where its step time goes (item 2).

    python benchmarks/bench_workload.py --model qwen2.5-7b --device cuda --methods mh,smc --out $OUT
    python benchmarks/bench_workload.py --model qwen2.5-7b --device cuda --methods mh --profile --out $OUT
    python benchmarks/bench_workload.py --model DIR --device cpu --prompts 2 --prompt-len 12 --budget 16 \
        --block-size 8 --steps 2 --out /tmp/w                                  # a small run on CPU

--model: a shape of run_benchmarks.SHAPES (random-init weights of the real shape) or an HF-format
directory. Defaults are the issue's: 64 prompts of ~150 random tokens (130-170, ragged), budget 768,
block 192, 10 MH steps, alpha 4, EOS off (every chain runs its full budget). After a short warm-up
call (Triton compilation, CUDA-graph captures), one timed call per method; reports wall time,
tokens sampled per second, positions computed, acceptance, and the wall time extrapolated to
--total-prompts (linearly: the batch of --prompts prompts is repeated). With --profile, first one
shorter call (--profile-budget tokens, 2 MH steps) runs under torch.profiler and the device (CUDA) or CPU
time is split into linear layers, attention, the sampling kernel, K/V copies and the rest; on CUDA
"host gaps" is wall time minus device-busy time. Writes workload-<model>.md/.json under --out.
Timings are measurements, never pass/fail tests.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import powersample_fast as pf  # noqa: E402
from powersample_fast.device import default_dtype, resolve_dtype, synchronize  # noqa: E402
from run_benchmarks import SHAPES, device_name, random_model, slug, versions  # noqa: E402

CATEGORIES = [  # (category, pattern over op/kernel names), first match wins
    ("sampling kernel", r"_sample_kernel|_sample_combine|sample_logprobs|gather_logprobs"),
    ("K/V copy (fork)", r"_kv_copy|kv_copy"),
    ("MH accept", r"_mh_accept|mh_accept"),
    ("attention", r"attention|sdpa|flash|fmha|efficient_attention"),
    ("linear layers", r"gemm|gemv|splitKreduce|matmul|aten::mm|aten::addmm|aten::linear|aten::bmm|nvjet|xmma|"
                      r"cutlass|mkldnn|onednn"),
]
RANGES = ("prefill", "decode", "sample", "fork", "accept")  # the engine's record_function ranges


def make_prompts(n, mean_len, vocab, seed=0):
    """n prompts of random token ids, lengths uniform in mean_len +- 13% (ragged, as real prompts)."""
    rng = random.Random(seed)
    lo, hi = max(1, round(mean_len * 0.87)), max(1, round(mean_len * 1.13))
    return [[rng.randrange(min(vocab, 1000)) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def load_model(name, device, dtype):
    if name in SHAPES:
        return random_model(name, device, dtype), name + " (random init)"
    if not Path(name).is_dir():
        sys.exit(f"--model {name}: neither a shape ({', '.join(SHAPES)}) nor a model directory")
    return pf.load(name, device=device, dtype=dtype)[0], name


def method_kwargs(method, args):
    kw = dict(method=method, alpha=args.alpha, max_new_tokens=args.budget)
    if method == "mh":
        kw.update(block_size=args.block_size, mcmc_steps=args.steps)
    elif method == "smc":
        kw.update(particles=args.particles)
    return kw


def warm_up(sampler, prompts, kw, max_batch):
    """A short call outside the timing: Triton compilation, CUDA-graph captures, the allocator."""
    short = dict(kw, max_new_tokens=min(8, kw["max_new_tokens"]), **({"block_size": 4} if kw["method"] == "mh" else {}))
    sampler.generate(prompts[:2], n=1, seed=1, progress=False, max_batch=max_batch, **short)


def run_once(sampler, prompts, kw, max_batch, seed):
    synchronize(sampler.model.device)
    t = time.perf_counter()
    res = sampler.generate(prompts, n=1, seed=seed, progress=False, max_batch=max_batch, **kw)
    synchronize(sampler.model.device)
    wall = time.perf_counter() - t
    st = sampler.last_stats
    return dict(wall_s=wall, samples=len(res), tokens_sampled=st["tokens_sampled"],
                tokens_per_s=st["tokens_sampled"] / wall, positions_computed=st["positions_computed"],
                positions_per_s=st["positions_computed"] / wall, decode_steps=st["decode_steps"],
                max_batch_rows=st["max_batch_rows"], acceptance=st["acceptance_rate"])


def breakdown(prof, wall_s, cuda):
    """Seconds per category of the profiled call's device (CUDA) or CPU self time, plus host gaps.
    On CUDA only the kernels themselves count: torch also charges each kernel's time to the aten op
    that launched it, and counting both would double it. The engine's ranges (RANGES) appear twice
    on CUDA, as host ranges and as GPU annotations; their host time is the CPU entry's."""
    from torch.autograd import DeviceType

    want = DeviceType.CUDA if cuda else DeviceType.CPU
    cats = {c: 0.0 for c, _ in CATEGORIES}
    cats["other"] = 0.0
    top, ranges = [], {}
    for e in prof.key_averages():
        if e.key in RANGES or getattr(e, "is_user_annotation", False):
            if e.key in RANGES and e.device_type == DeviceType.CPU:
                ranges[e.key] = e.cpu_time_total / 1e6
            continue
        if e.device_type != want:
            continue
        t = (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6
        if t <= 0:
            continue
        cat = next((c for c, pat in CATEGORIES if re.search(pat, e.key, re.I)), "other")
        cats[cat] += t
        top.append((t, e.key, e.count, cat))
    busy = sum(cats.values())
    out = {"wall_s": wall_s, "busy_s": busy, "categories_s": cats}
    if cuda:
        out["host_gaps_s"] = max(0.0, wall_s - busy)
    out["ranges_cpu_s"] = ranges
    out["top_ops"] = [dict(name=k[:90], s=t, calls=n, category=c) for t, k, n, c in sorted(top, reverse=True)[:25]]
    return out


def profile_run(sampler, prompts, args, max_batch):
    kw = dict(method_kwargs("mh", args), max_new_tokens=args.profile_budget, mcmc_steps=2)
    acts = [torch.profiler.ProfilerActivity.CPU]
    cuda = sampler.model.device.type == "cuda"
    if cuda:
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        r = run_once(sampler, prompts, kw, max_batch, seed=7)
    if args.trace:
        prof.export_chrome_trace(str(Path(args.out) / "workload-trace.json"))
    return dict(breakdown(prof, r["wall_s"], cuda), settings=kw, run=r)


def write(report, out: Path, name):
    out.mkdir(parents=True, exist_ok=True)
    (out / f"workload-{name}.json").write_text(json.dumps(report, indent=1))
    m = report["meta"]
    lines = [f"# MATH500-shaped workload: {m['model']} on {m['device']}", "",
             f"- versions: {m['versions']}", f"- command: `{m['command']}`", f"- date: {m['date']}",
             f"- {m['prompts']} prompts of {m['prompt_len']} tokens (ragged), budget {m['budget']}, alpha "
             f"{m['alpha']}, EOS off, dtype {m['dtype']}, CUDA graphs {m['cuda_graphs']}", "",
             f"| method | settings | wall s | tokens/s | positions/s | acceptance | max rows | "
             f"extrapolated to {m['total_prompts']} prompts |", "|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['method']} | {r['settings']} | {r['wall_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['positions_per_s']:.0f} | {r['acceptance']:.3f} | {r['max_batch_rows']} | "
                     f"{r['extrapolated_s']:.0f} s ({r['extrapolated_s'] / 60:.1f} min) |")
    if "profile" in report:
        p = report["profile"]
        lines += ["", f"## Profile (mh, budget {p['settings']['max_new_tokens']}, 2 steps): wall {p['wall_s']:.2f} s, "
                  f"busy {p['busy_s']:.2f} s" + (f", host gaps {p['host_gaps_s']:.2f} s" if "host_gaps_s" in p else ""),
                  "", "| category | s | share of wall |", "|---|---|---|"]
        lines += [f"| {c} | {s:.3f} | {s / p['wall_s']:.1%} |" for c, s in p["categories_s"].items()]
        lines += ["", "| engine range (host time, includes launches and waits) | s |", "|---|---|"]
        lines += [f"| {k} | {s:.3f} |" for k, s in p["ranges_cpu_s"].items()]
        lines += ["", "| top op / kernel | s | calls | category |", "|---|---|---|---|"]
        lines += [f"| `{o['name']}` | {o['s']:.3f} | {o['calls']} | {o['category']} |" for o in p["top_ops"]]
    (out / f"workload-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-7b", help=f"a shape ({', '.join(SHAPES)}) or a model directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: the device's default (bf16 on CUDA)")
    ap.add_argument("--methods", default="mh", help="comma list of mh, smc, plain")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=150)
    ap.add_argument("--budget", type=int, default=768)
    ap.add_argument("--block-size", type=int, default=192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--particles", type=int, default=64, help="smc particles per prompt")
    ap.add_argument("--max-batch", type=int, default=None,
                    help="decode rows (default: --prompts for mh/plain, 4 * --particles for smc)")
    ap.add_argument("--total-prompts", type=int, default=500, help="extrapolate the wall time to this many prompts")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile one shorter mh call")
    ap.add_argument("--profile-budget", type=int, default=192)
    ap.add_argument("--trace", action="store_true", help="with --profile: write workload-trace.json too")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    dtype = resolve_dtype(args.dtype) if args.dtype else default_dtype(args.device)
    model, label = load_model(args.model, args.device, dtype)
    sampler = pf.PowerSampler(model, None, eos_token_ids=[], cuda_graphs=args.cuda_graphs)
    prompts = make_prompts(args.prompts, args.prompt_len, model.config.vocab_size)
    meta = dict(model=label, device=device_name(model.device), dtype=str(model.dtype).replace("torch.", ""),
                versions=versions(), command=" ".join(["python"] + sys.argv),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), prompts=args.prompts,
                prompt_len=f"{min(map(len, prompts))}-{max(map(len, prompts))}", budget=args.budget,
                alpha=args.alpha, total_prompts=args.total_prompts, cuda_graphs=args.cuda_graphs)
    report = {"meta": meta, "runs": []}
    name = slug(f"{Path(args.model).name}-{meta['device']}")
    if args.profile:  # first (after a warm-up): a time limit that cuts the long runs short leaves it
        mh_rows = args.max_batch or args.prompts
        warm_up(sampler, prompts, method_kwargs("mh", args), mh_rows)
        report["profile"] = profile_run(sampler, prompts, args, mh_rows)
        write(report, Path(args.out), name)
    for method in args.methods.split(","):
        kw = method_kwargs(method, args)
        rows = args.max_batch or (4 * args.particles if method == "smc" else args.prompts)
        warm_up(sampler, prompts, kw, rows)
        r = run_once(sampler, prompts, kw, rows, seed=0)
        r.update(method=method, settings=", ".join(f"{k} {v}" for k, v in kw.items() if k != "method"),
                 max_batch=rows, extrapolated_s=r["wall_s"] * args.total_prompts / args.prompts)
        report["runs"].append(r)
        print(f"{method}: {r['wall_s']:.1f} s, {r['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
        write(report, Path(args.out), name)  # after every method: a run cut short keeps what it measured
    return report


if __name__ == "__main__":
    from powersample_fast.errors import PowerSampleError

    try:
        main()
    except PowerSampleError as e:  # bad settings for this model (context too short, ...): one line
        sys.exit(f"bench_workload: {e}")
