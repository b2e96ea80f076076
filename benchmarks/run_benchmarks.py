"""End-to-end benchmark: the naive sampler (HF generate per proposal) vs ours (1/8/32/64 chains).

    python benchmarks/run_benchmarks.py --cpu-default            # real SmolLM2-135M on CPU
    python benchmarks/run_benchmarks.py --cpu-default --dtypes float32,bfloat16 --naive-chains 1,8 --repeat 3
    python benchmarks/run_benchmarks.py --gpu [--models qwen2.5-1.5b,...] [--out DIR]   # random-init real shapes

Writes `<out>/<device>.md` and `.json` (device, versions, command, load average, table). Each MCMC
row is the median of --repeat timed runs (spread in "wall_s_range") after a short warm-up call
(Triton compilation, graph capture, allocator); the repeats are interleaved (naive and ours in turn)
so a change in machine load hits both alike. "s_per_sample" is the call's wall time divided by its
samples (amortised over the batch). With n in --naive-chains the naive sampler also draws n samples
(n chains one after the other) and "speedup_wall" is naive wall / our wall for the same n samples;
otherwise "speedup_tok_s" compares tokens/s with the naive 1-chain row. Both samplers run in the
same dtype (--dtypes; default `device.default_dtype`). Nothing here is a pass/fail test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import powersample_fast as pf  # noqa: E402
from powersample_fast.device import default_dtype, resolve_dtype, synchronize  # noqa: E402
from powersample_fast.models.loader import _build  # noqa: E402
from powersample_fast.models.config import ModelConfig  # noqa: E402
from powersample_fast.api import PowerSampler  # noqa: E402

# Real shapes (values random: speed does not depend on them).
SHAPES = {
    "llama-3.2-1b": dict(architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=2048,
                         intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=500000.0, tie_word_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "qwen2.5-1.5b": dict(architectures=["Qwen2ForCausalLM"], vocab_size=151936, hidden_size=1536,
                         intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_theta=1000000.0, tie_word_embeddings=False),
    "phi-3.5-mini": dict(architectures=["Phi3ForCausalLM"], vocab_size=32064, hidden_size=3072,
                         intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, max_position_embeddings=131072, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 48,
                                       "long_factor": [1.5] * 48, "original_max_position_embeddings": 4096}),
}


def random_model(name, device, dtype):
    cfg = ModelConfig.from_hf(SHAPES[name])
    from powersample_fast.models.transformer import Transformer

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    sd = {k: torch.empty(s, device=device, dtype=dtype).normal_(0, 0.02) for k, s in shapes.items()}
    model = _build(cfg, sd, device)
    return model


def hf_twin(model, name):
    """An HF model of shape `name` (ours has it too), with its own random weights (for the naive
    sampler: speed does not depend on the values)."""
    import transformers

    cfg = model.config
    d = dict(SHAPES[name])
    hcfg = transformers.AutoConfig.for_model({"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                                              "Phi3ForCausalLM": "phi3"}[cfg.arch], **{k: v for k, v in d.items()
                                                                                       if k != "architectures"})
    # built on the target device (random init there is quick); not on meta + to_empty, which would
    # leave HF's non-persistent RoPE buffers uninitialised
    with torch.device(model.device):
        hf = transformers.AutoModelForCausalLM.from_config(hcfg, dtype=model.dtype)
    return hf.eval()


def roofline_copy_bandwidth(device) -> float:
    """Measured device copy bandwidth in bytes/s (read + write of a 1 GiB buffer; 256 MiB on CPU)."""
    n = (1 << 30) if torch.device(device).type == "cuda" else (1 << 28)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    synchronize(device)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        synchronize(device)
        ts.append(time.perf_counter() - t)
    return 2 * n / min(ts)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def plain_decode(model, n_tokens, batch, prompt_len=128, graphs=False):
    """Our cached decode (optionally replayed from CUDA graphs): seconds per step of B rows."""
    cache = pf.KVCache(model.config, batch, prompt_len + n_tokens + 8, device=model.device, dtype=model.dtype)
    dec = None
    if graphs:
        from powersample_fast.engine.cuda_graphs import DecodeGraphs

        dec = DecodeGraphs(model, cache, batch, batch_multiple=1)
    x = torch.randint(0, min(1000, model.config.vocab_size), (batch, prompt_len), device=model.device)
    with torch.inference_mode():
        for r in range(batch):
            model.forward_cached(x[r:r + 1], cache, rows=r, last_only=True)
        tok = torch.zeros(batch, 1, dtype=torch.int64, device=model.device)
        def step(t):
            if dec is None:
                return model.forward_cached(t, cache)
            pos = torch.tensor(cache.host_lengths[:batch], device=t.device)
            return dec.step(t[:, 0], pos, batch)[:, None]

        for _ in range(3):  # warm-up (and graph capture)
            step(tok)
        synchronize(model.device)
        t = time.perf_counter()
        for _ in range(n_tokens):
            logits = step(tok)
            tok = logits[:, -1].argmax(-1, keepdim=True)
        synchronize(model.device)
        dt = time.perf_counter() - t
    return dt / n_tokens, prompt_len + n_tokens // 2


def hf_decode(hf, n_tokens, prompt_len=128):
    x = torch.randint(0, min(1000, hf.config.vocab_size), (1, prompt_len), device=hf.device)
    with torch.inference_mode():
        hf.generate(x, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        synchronize(hf.device)
        t = time.perf_counter()
        hf.generate(x, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
        synchronize(hf.device)
    return (time.perf_counter() - t) / n_tokens


def mcmc_prepare(kind, model_or_hf, tok, prompts, n, settings, eos, cuda_graphs=False):
    """A sampler after a short warm-up call, and a function running one timed call of n samples
    (seed `rep`) that returns its measurements."""
    if kind == "naive":
        from powersample_fast.naive import NaiveSampler

        s = NaiveSampler(model_or_hf, tok, eos_token_ids=eos)
        kw = {}
        s.generate(prompts, n=1, progress=False, seed=1, **dict(settings, max_new_tokens=8, block_size=4))  # warm-up
    else:
        s = PowerSampler(model_or_hf, tok, eos_token_ids=eos, cuda_graphs=cuda_graphs)
        kw = {"max_batch": n}
        # warm-up outside the timing: Triton compilation, CUDA-graph captures of the first buckets
        s.generate(prompts, n=min(n, 2), progress=False, seed=1, **dict(settings, max_new_tokens=8, block_size=4),
                   **kw)

    def run(rep=0):
        synchronize(s.model.device if hasattr(s.model, "device") else "cpu")
        t = time.perf_counter()
        res = s.generate(prompts, n=n, progress=False, seed=rep, **settings, **kw)
        synchronize(s.model.device)
        wall = time.perf_counter() - t
        sampled = sum(r.stats["tokens_sampled"] for r in res)
        prefilled = sum(r.stats["tokens_prefilled"] for r in res)
        return {"wall_s": wall, "samples": len(res), "tokens_sampled": sampled, "tokens_prefilled": prefilled,
                "tok_per_s": sampled / wall, "s_per_sample": wall / len(res),
                "acceptance": sum(r.accepted for r in res) / max(1, sum(r.proposed for r in res))}

    return run


def median_run(runs):
    """The run with the median wall time (of an odd count; the lower middle one otherwise), with
    the spread of the walls and the median of tokens/s over the runs."""
    runs = sorted(runs, key=lambda r: r["wall_s"])
    mid = dict(runs[(len(runs) - 1) // 2])
    mid["wall_s_range"] = f"{runs[0]['wall_s']:.3g}-{runs[-1]['wall_s']:.3g}" if len(runs) > 1 else ""
    mid["repeats"] = len(runs)
    mid["tok_per_s"] = statistics.median(r["tok_per_s"] for r in runs)
    return mid


def mcmc_run(kind, model_or_hf, tok, prompts, n, settings, eos, cuda_graphs=False, repeat=1):
    run = mcmc_prepare(kind, model_or_hf, tok, prompts, n, settings, eos, cuda_graphs)
    return median_run([run(rep) for rep in range(repeat)])


def versions():
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:
        v["triton"] = None
    return v


def slug(text: str) -> str:
    """A file-name-safe form of a device or model name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}core-{platform.machine()}"


def bench_model(name, model, hf, tok, prompt_ids, args, rows):
    dev = model.device
    bw = roofline_copy_bandwidth(dev)
    wb = weight_bytes(model)
    kv_per_pos = 2 * model.config.n_layers * model.config.n_kv_heads * model.config.head_dim * model.dtype.itemsize
    step_s, avg_ctx = plain_decode(model, args.decode_tokens, 1)
    step8_s, _ = plain_decode(model, args.decode_tokens, 8)
    roof_s = (wb + kv_per_pos * avg_ctx) / bw
    hf_s = hf_decode(hf, args.decode_tokens)
    base = {"model": name, "device": device_name(dev), "dtype": str(model.dtype).replace("torch.", "")}
    if dev.type == "cuda":
        g_s, _ = plain_decode(model, args.decode_tokens, 1, graphs=True)
        rows.append(dict(base, kind="plain decode (ours + CUDA graphs, 1 row)", tok_per_s=1 / g_s, s_per_step=g_s,
                         roofline_s=roof_s, roofline_frac=roof_s / g_s))
    rows.append(dict(base, kind="plain decode (ours, 1 row)", tok_per_s=1 / step_s, s_per_step=step_s,
                     roofline_s=roof_s, roofline_frac=roof_s / step_s, copy_GBps=bw / 1e9))
    rows.append(dict(base, kind="plain decode (ours, 8 rows)", tok_per_s=8 / step8_s, s_per_step=step8_s,
                     step_vs_1_row=step8_s / step_s))
    rows.append(dict(base, kind="plain decode (HF generate)", tok_per_s=1 / hf_s, s_per_step=hf_s,
                     roofline_frac=roof_s / hf_s))
    settings = dict(alpha=4.0, block_size=args.block_size, mcmc_steps=args.steps, max_new_tokens=args.naive_budget)
    eos = []  # random weights: disable EOS so every run has the same, full length
    # every sampler warmed up first, then the repeats interleaved: naive n, ours n, for each n in turn
    naive_ns = sorted(set(args.naive_chains) | {1})
    runs = {("naive", n): mcmc_prepare("naive", hf, tok, [prompt_ids], n, settings, eos) for n in naive_ns}
    runs.update({("ours", n): mcmc_prepare("ours", model, tok, [prompt_ids], n, settings, eos)
                 for n in sorted(set(args.chains) | {1})})
    got = {k: [] for k in runs}
    for rep in range(args.repeat):
        for key in sorted(runs, key=lambda k: (k[1], k[0])):
            got[key].append(runs[key](rep))
            print(f"[{base['dtype']}] rep {rep} {key[0]} n={key[1]}: {got[key][-1]['wall_s']:.1f} s, "
                  f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    res = {k: median_run(v) for k, v in got.items()}
    naive1 = res["naive", 1]
    for n in sorted(set(args.chains) | {1}):
        what = "1 chain (1 sample)" if n == 1 else f"{n} chains ({n} samples)"
        if n in naive_ns:
            nv = res["naive", n]
            rows.append(dict(base, kind=f"MCMC naive (HF generate per proposal), {what}", **settings, **nv))
        ours = res["ours", n]
        extra = {"speedup_tok_s": ours["tok_per_s"] / naive1["tok_per_s"]}
        if n in naive_ns:
            extra["speedup_wall"] = res["naive", n]["wall_s"] / ours["wall_s"]
        rows.append(dict(base, kind=f"MCMC ours, {what}", **settings, **ours, **extra))
    if dev.type == "cuda":  # the same runs with decode steps replayed from CUDA graphs
        for n in args.chains:
            r = mcmc_run("ours", model, tok, [prompt_ids], n, settings, eos, cuda_graphs=True)
            rows.append(dict(base, kind=f"MCMC ours + CUDA graphs, {n} chains", **settings, **r,
                             speedup_wall=res["naive", n]["wall_s"] / r["wall_s"] if n in naive_ns else "",
                             speedup_tok_s=r["tok_per_s"] / naive1["tok_per_s"]))


def write(rows, args, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    dev = rows[0]["device"] if rows else "unknown"
    name = slug(dev)
    meta = {"device": dev, "versions": versions(), "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": {"start": list(args.load_start), "end": [round(x, 2) for x in os.getloadavg()]}}
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = ["model", "dtype", "kind", "max_new_tokens", "block_size", "wall_s", "wall_s_range", "tok_per_s",
            "s_per_sample", "s_per_step", "step_vs_1_row", "speedup_wall", "speedup_tok_s", "roofline_frac",
            "acceptance", "tokens_prefilled"]
    la = meta["load_average"]
    lines = [f"# Benchmark on {dev}", "", f"- versions: {meta['versions']}", f"- command: `{meta['command']}`",
             f"- date: {meta['date']}; torch threads {meta['threads']}; CPU capability {meta['cpu_capability']}",
             f"- load average (1/5/15 min) at start {la['start'][0]:.2f} {la['start'][1]:.2f} {la['start'][2]:.2f},"
             f" at end {la['end'][0]:.2f} {la['end'][1]:.2f} {la['end'][2]:.2f}",
             f"- MCMC rows: median of {args.repeat} interleaved timed runs (wall_s_range: min-max)",
             "- settings: alpha 4, block/steps/budget as in the columns; EOS disabled "
             "(random or fixed lengths); speedup_wall: naive wall / ours for the same samples, "
             "speedup_tok_s: tokens/s over the naive 1-chain row, same dtype", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-default", action="store_true", help="real default model (SmolLM2-135M) on CPU")
    ap.add_argument("--gpu", action="store_true", help="random-init real shapes on CUDA in bf16")
    ap.add_argument("--models", default="llama-3.2-1b,qwen2.5-1.5b,qwen2.5-7b,phi-3.5-mini")
    ap.add_argument("--chains", default="1,8,32,64")
    ap.add_argument("--block-size", type=int, default=192)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--naive-budget", type=int, default=384, help="max_new_tokens for the MCMC comparisons")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--dtypes", default=None, help="--cpu-default: comma list (default: device.default_dtype('cpu'))")
    ap.add_argument("--naive-chains", default="1", help="sample counts the naive sampler also runs (n chains in turn)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per MCMC row (median reported)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    args.chains = [int(x) for x in args.chains.split(",")]
    args.naive_chains = [int(x) for x in args.naive_chains.split(",")]
    args.load_start = [round(x, 2) for x in os.getloadavg()]
    rows = []
    if args.cpu_default:
        from transformers import AutoModelForCausalLM

        from powersample_fast.models.default_model import default_model_dir

        d = default_model_dir()
        dtypes = [resolve_dtype(x) for x in args.dtypes.split(",")] if args.dtypes else [default_dtype("cpu")]
        for dtype in dtypes:  # our model and the naive baseline's HF model in the same dtype
            model, tok = pf.load(d, device="cpu", dtype=dtype)
            hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
            prompt = tok.apply_chat_template([{"role": "user", "content": "Explain why the sky is blue."}],
                                             add_generation_prompt=True, tokenize=True)
            prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
            bench_model("SmolLM2-135M-Instruct (real weights)", model, hf, tok, prompt, args, rows)
            write(rows, args, Path(args.out))  # after every dtype: a run cut short keeps what it measured
            del model, hf
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device")
        for name in args.models.split(","):
            model = random_model(name, "cuda", torch.bfloat16)
            hf = hf_twin(model, name)
            prompt = torch.randint(0, 1000, (128,)).tolist()
            bench_model(name + " (random init)", model, hf, None, prompt, args, rows)
            write(rows, args, Path(args.out))  # after every model: a run cut short keeps what it measured
            del model, hf
            torch.cuda.empty_cache()
    if not rows:
        ap.error("choose --cpu-default and/or --gpu")
    write(rows, args, Path(args.out))


if __name__ == "__main__":
    main()
