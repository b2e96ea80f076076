"""One decode step of the default model on CPU, per part, at 1 and 8 rows; optionally against another
git revision of the package in the same process (interleaved, so machine load hits both alike).

    python benchmarks/bench_cpu_step.py --base e4f93d6 --rows 1,8 --reps 5 [--threads 1] [--dtype float32]

A step is `model.cached_core` on rows of 128 prompt tokens (different lengths per row, as MH chains
have) plus `sample_logprobs` at inv_tau 4 (the MH proposal at alpha 4) on its logits. Variants:
"base" (the revision, imported as a separate package), "cur" (this tree), and "cur -onednn" (this
tree with `cpu_linear.set_onednn_linear(False)`). Printed: median ms and spread over --reps, the load
average before and after, and whether each variant's logits equal the base's bit for bit.
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


def import_revision(rev: str):
    """The package at git revision `rev`, imported as `psf_base` (its imports are relative)."""
    tmp = Path(tempfile.mkdtemp(prefix="psf_base_"))
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "powersample_fast"], check=True,
                         capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
    (tmp / "powersample_fast").rename(tmp / "psf_base")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("psf_base")


def make_rows(pkg, model, B, prompt_len):
    """A KV cache with B rows of prompt_len - 3 .. prompt_len tokens (ragged, as MH chains are)."""
    cache = pkg.KVCache(model.config, B, prompt_len + 64, dtype=model.dtype)
    x = torch.randint(0, 1000, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for r in range(B):
            model.forward_cached(x[:, : prompt_len - r % 4], cache, rows=r, last_only=True)
    return cache


def step_fns(pkg, model, cache, B):
    ref = importlib.import_module(pkg.__name__ + ".reference")
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

    return {"forward": forward, "sample": sample, "step": both}, logits


def timed(f, n):
    f()
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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import powersample_fast as cur
    from powersample_fast import cpu_linear as cur_linear
    from powersample_fast.hub import default_model_dir

    d = default_model_dir()
    pkgs = {"cur": cur}
    if args.base:
        pkgs = {"base": import_revision(args.base), **pkgs}
    variants = {}  # name -> (pkg, model, onednn flag or None)
    for name, pkg in pkgs.items():
        m = pkg.load(d, device="cpu", dtype=args.dtype)[0]
        variants[name] = (pkg, m, True if name == "cur" else None)
        if name == "cur" and hasattr(cur_linear, "set_onednn_linear"):
            variants["cur -onednn"] = (pkg, m, False)
    rows = [int(r) for r in args.rows.split(",")]
    fns, logits = {}, {}
    with torch.inference_mode():
        for B in rows:
            for name, (pkg, m, flag) in variants.items():
                if flag is not None:
                    cur_linear.set_onednn_linear(flag)
                cache = make_rows(pkg, m, B, args.prompt_len)
                fns[name, B], logits[name, B] = step_fns(pkg, m, cache, B)
        cur_linear.set_onednn_linear(True)
        load0 = os.getloadavg()
        res = {}
        for _ in range(args.reps):
            for B in rows:
                for name, (pkg, m, flag) in variants.items():
                    if flag is not None:
                        cur_linear.set_onednn_linear(flag)
                    for part, f in fns[name, B].items():
                        res.setdefault((B, name, part), []).append(timed(f, args.calls))
        cur_linear.set_onednn_linear(True)
        load1 = os.getloadavg()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    print(f"command: python {' '.join(sys.argv)}")
    print("| rows | variant | forward ms | sample ms | step ms | step spread | logits vs base |")
    print("|---|---|---|---|---|---|---|")
    for B in rows:
        for name in variants:
            med = {p: statistics.median(res[B, name, p]) for p in ("forward", "sample", "step")}
            spread = f"{min(res[B, name, 'step']):.1f}-{max(res[B, name, 'step']):.1f}"
            if "base" in variants and name != "base":
                diff = (logits[name, B] - logits["base", B]).abs().max().item()
                same = "identical" if diff == 0 else f"max diff {diff:.2g}"
            else:
                same = ""
            print(f"| {B} | {name} | {med['forward']:.1f} | {med['sample']:.2f} | {med['step']:.1f} | {spread} | {same} |")


if __name__ == "__main__":
    main()
