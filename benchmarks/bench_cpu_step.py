"""One decode step of the default model on CPU, per part, at 1 and 8 rows; optionally against another
git revision of the package in the same process (interleaved, so machine load hits both alike).

    python benchmarks/bench_cpu_step.py --base main --rows 1,8 --reps 5 [--threads 1] [--dtype float32]

Parts, each timed as the median over --reps of --calls calls, variants interleaved (A B A B ...):
- forward: `model.cached_core` on rows of 128 prompt tokens (different lengths per row, as MH chains
  have); the cache lengths are not advanced, so every call is the same step.
- sample: the CPU sampling pass (`ops.reference.sample_logprobs`) at inv_tau 4 (the MH proposal at
  alpha 4) on that step's logits.
- step: forward + sample.
- engine: one `Engine.step()` (what `PowerSampler.generate` loops over: the runner's decode, sampling,
  host bookkeeping) with B plain chains at temperature 1/4, EOS off; every call decodes a new position
  (after WARM_STEPS untimed steps, so on CPU the step is the traced one of engine/cpu_step.py).
Variants: "base" (the revision, imported as a separate package), "cur" (this tree) and, with
--no-onednn, "cur -onednn" (this tree with `cpu_linear.set_onednn_linear(False)`). Printed: median ms
and spread, the load average before and after, and whether each variant's logits equal the base's.
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PARTS = ("forward", "sample", "step", "engine")
WARM_STEPS = 24  # > engine/cpu_step.TRACE_AFTER: the timed engine steps are the steady state


def import_revision(rev: str):
    """The package at git revision `rev`, imported as `psf_base` (its imports are relative)."""
    tmp = Path(tempfile.mkdtemp(prefix="psf_base_"))
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "powersample_fast"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
    (tmp / "powersample_fast").rename(tmp / "psf_base")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("psf_base")


def submodule(pkg, *names):
    """The first of pkg.<name> that imports (modules moved between revisions)."""
    for n in names:
        try:
            return importlib.import_module(f"{pkg.__name__}.{n}")
        except ImportError:
            continue
    raise ImportError(f"none of {names} in {pkg.__name__}")


def make_rows(pkg, model, B, prompt_len):
    """A KV cache with B rows of prompt_len - 3 .. prompt_len tokens (ragged, as MH chains are)."""
    cache = pkg.KVCache(model.config, B, prompt_len + 64, dtype=model.dtype)
    x = torch.randint(0, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for r in range(B):
            model.forward_cached(x[:, : prompt_len - r % 4], cache, rows=r, last_only=True)
    return cache


def engine_fn(pkg, model, B, prompt_len, steps):
    """Engine.step() on B plain chains at temperature 1/4 (EOS off), prefilled and warmed up."""
    eng_mod = submodule(pkg, "engine")
    sp = submodule(pkg, "sampling_params", "params")
    eng = eng_mod.Engine(model, None, eos_token_ids=[], max_batch=B, max_len=prompt_len + steps + WARM_STEPS + 16)
    prompt = torch.randint(0, 1000, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    eng.add_request(prompt, sp.SamplingParams(method="plain", n=B, max_new_tokens=steps + WARM_STEPS + 8, seed=0,
                                              proposal_temperature=0.25))
    with torch.inference_mode():
        for _ in range(WARM_STEPS):  # admit + prefill, then decode steps past the CPU trace's lazy start
            eng.step()

    def step():
        return eng.step()

    return step


def step_fns(pkg, model, cache, B, prompt_len, steps):
    ref = submodule(pkg, "ops.reference", "reference")
    lengths = cache.host_lengths[:B]
    kv_len = max(lengths) + 1
    pos = torch.tensor(lengths)[:, None]
    tok = torch.zeros(B, 1, dtype=torch.int64)
    keys = ref.row_key(torch.full((B,), 5), torch.arange(B))

    def forward():  # the cache lengths are not advanced: every call is the same step
        return model.cached_core(tok, pos, cache, slice(0, B), kv_len, kv_len - 1)[:, 0]

    logits = forward()

    def sample():
        return ref.sample_logprobs(logits, keys, 4.0)

    def both():
        return ref.sample_logprobs(forward(), keys, 4.0)

    fns = {"forward": forward, "sample": sample, "step": both,
           "engine": engine_fn(pkg, model, B, prompt_len, steps)}
    return fns, (logits, sample())


def timed(f, n):
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=None, help="git revision to compare with (default: none)")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5, help="calls per timing")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--no-onednn", action="store_true", help="add the 'cur -onednn' variant")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p for p in args.parts.split(",") if p]
    import powersample_fast as cur
    from powersample_fast.models import cpu_linear as cur_linear
    from powersample_fast.models.default_model import default_model_dir

    d = default_model_dir()
    pkgs = {"cur": cur}
    if args.base:
        pkgs = {"base": import_revision(args.base), **pkgs}
    variants = {}  # name -> (pkg, model, onednn flag or None)
    for name, pkg in pkgs.items():
        m = pkg.load(d, device="cpu", dtype=args.dtype)[0]
        variants[name] = (pkg, m, True if name == "cur" else None)
        if name == "cur" and args.no_onednn:
            variants["cur -onednn"] = (pkg, m, False)
    rows = [int(r) for r in args.rows.split(",")]
    steps = (args.reps + 1) * args.calls + 8
    fns, outs = {}, {}
    with torch.inference_mode():
        for B in rows:
            for name, (pkg, m, flag) in variants.items():
                if flag is not None:
                    cur_linear.set_onednn_linear(flag)
                cache = make_rows(pkg, m, B, args.prompt_len)
                fns[name, B], outs[name, B] = step_fns(pkg, m, cache, B, args.prompt_len, steps)
        cur_linear.set_onednn_linear(True)
        for B in rows:  # one untimed call of each part
            for name, (pkg, m, flag) in variants.items():
                for part in parts:
                    fns[name, B][part]()
        load0 = os.getloadavg()
        res = {}
        for _ in range(args.reps):
            for B in rows:
                for part in parts:
                    for name, (pkg, m, flag) in variants.items():
                        if flag is not None:
                            cur_linear.set_onednn_linear(flag)
                        res.setdefault((B, name, part), []).append(timed(fns[name, B][part], args.calls))
                        cur_linear.set_onednn_linear(True)
        load1 = os.getloadavg()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, cpu {cpu_name()}")
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(f"command: python {' '.join(sys.argv)}")
    print("| rows | variant | " + " | ".join(f"{p} ms" for p in parts) + " | step spread | logits, sample vs base |")
    print("|---|---|" + "---|" * len(parts) + "---|---|")
    for B in rows:
        for name in variants:
            med = {p: statistics.median(res[B, name, p]) for p in parts}
            key = "step" if "step" in parts else parts[0]
            spread = f"{min(res[B, name, key]):.1f}-{max(res[B, name, key]):.1f} ({key})"
            same = ""
            if "base" in variants and name != "base":
                (lg, smp), (lg0, smp0) = outs[name, B], outs["base", B]
                diff = (lg.float() - lg0.float()).abs().max().item()
                same = "identical" if diff == 0 else f"max diff {diff:.2g}"
                same += ", " + ("identical" if all(torch.equal(a, b) for a, b in zip(smp, smp0)) else "differs")
            print(f"| {B} | {name} | " + " | ".join(f"{med[p]:.2f}" for p in parts) + f" | {spread} | {same} |")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
