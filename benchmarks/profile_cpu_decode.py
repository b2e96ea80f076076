"""Where the time of one CPU decode step goes: the default model, `Engine.step()` on B plain chains at
temperature 1/4 (the MH proposal at alpha 4), EOS off, split by torch.profiler into linear layers,
attention, the K/V write, norms / RoPE / element-wise ops, sampling over the vocabulary and host
work (Python in the model, the runner and the engine; what no op accounts for).

    python benchmarks/profile_cpu_decode.py --dtype bfloat16 --rows 1 --threads 1 [--steps 20]

Prints the wall time per step without the profiler (median), then the profiled split: each category's
op self time per step. Host work is the profiled step's wall time minus every op's self time (the
profiler adds ~1-2 us per op to it, so it is an upper bound)."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_cpu_step import cpu_name  # noqa: E402

LINEAR = ("aten::mm", "aten::addmm", "mkldnn::_linear_pointwise", "aten::bmm", "powersample_fast::gemv_bf16", "aten::mv", "aten::addmv_")
ATTN = ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math")
KV = ("aten::_index_put_impl_", "aten::index_put_", "aten::index_copy_")
WRAPPERS = {"decode", "sample", "fork", "prefill"}  # record_function scopes: their self time is Python


def category(name: str, in_sample: bool) -> str:
    if in_sample:
        return "sampling (49k vocab)"
    if name in LINEAR:
        return "linear layers"
    if name in ATTN:
        return "attention (SDPA)"
    if name in KV:
        return "K/V write (index_put)"
    if name in ("aten::empty", "aten::empty_strided", "aten::resize_", "aten::zeros", "aten::zero_",
                "aten::full", "aten::fill_"):
        return "allocations (empty/zeros/fill)"
    if name in ("aten::embedding", "aten::index_select"):
        return "embedding"
    return "norms, RoPE, element-wise, views"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: this CPU's default)")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--top", type=int, default=0, help="also print the top N ops by self time")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import powersample_fast as pf
    from bench_cpu_step import engine_fn

    model = pf.load("default", device="cpu", dtype=args.dtype)[0]
    step = engine_fn(pf, model, args.rows, args.prompt_len, 4 * args.steps + 16)
    with torch.inference_mode():
        for _ in range(3):
            step()
        ts = []
        for _ in range(args.steps):
            t = time.perf_counter()
            step()
            ts.append(time.perf_counter() - t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            wall_prof = (time.perf_counter() - t) / args.steps * 1e3
    # self time per category; ops under the "sample" scope count as sampling
    events = prof.events()
    sample_ranges = [(e.time_range.start, e.time_range.end) for e in events if e.name == "sample"]
    cats, ops_total, per_op = {}, 0.0, {}
    for e in events:
        if e.name in WRAPPERS or e.name.startswith("ProfilerStep"):
            continue
        st = e.time_range.start
        in_s = any(a <= st <= b for a, b in sample_ranges)
        c = category(e.name, in_s)
        us = e.self_cpu_time_total
        cats[c] = cats.get(c, 0.0) + us
        ops_total += us
        per_op[e.name] = per_op.get(e.name, 0.0) + us
    n = args.steps
    print(f"cpu {cpu_name()}, torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {model.dtype}, "
          f"rows {args.rows}, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"step wall time without profiler: median {statistics.median(ts) * 1e3:.1f} ms "
          f"(min {min(ts) * 1e3:.1f}, max {max(ts) * 1e3:.1f}); with profiler {wall_prof:.1f} ms")
    print("| part | ms per step | share of profiled step |")
    print("|---|---|---|")
    for c, us in sorted(cats.items(), key=lambda kv: -kv[1]):
        print(f"| {c} | {us / n / 1e3:.2f} | {us / n / 1e3 / wall_prof:.0%} |")
    host = wall_prof - ops_total / n / 1e3
    print(f"| host work (Python: model, runner, engine; profiler overhead) | {host:.2f} | {host / wall_prof:.0%} |")
    n_ops = sum(1 for e in events if e.name not in WRAPPERS)
    print(f"profiled op calls per step (nested calls included): {n_ops / n:.0f}")
    if args.top:
        for name, us in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {name:50s} {us / n / 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
