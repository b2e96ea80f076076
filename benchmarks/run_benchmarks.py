"""End-to-end benchmark: the naive sampler (HF generate per proposal) vs ours (1/8/32/64 chains).

    python benchmarks/run_benchmarks.py --cpu-default            # real SmolLM2-135M on CPU
    python benchmarks/run_benchmarks.py --gpu [--models qwen2.5-1.5b,...] [--out DIR]   # random-init real shapes

Writes `<out>/<device>.md` and `.json` (device, versions, command, table). Each MCMC row is one timed
run after a short warm-up call (Triton compilation, graph capture, allocator); "s_per_sample" is the
call's wall time divided by its samples (amortised over the batch). Nothing here is a pass/fail test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import powersample_fast as pf  # noqa: E402
from powersample_fast.device import synchronize  # noqa: E402
from powersample_fast.loader import _build  # noqa: E402
from powersample_fast.model import ModelConfig  # noqa: E402
from powersample_fast.sampler import PowerSampler  # noqa: E402

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
    from powersample_fast.model import Transformer

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    sd = {k: torch.empty(s, device=device, dtype=dtype).normal_(0, 0.02) for k, s in shapes.items()}
    model = _build(cfg, sd, device)
    return model


def hf_twin(model):
    """An HF model of the same shape as ours, with its own random weights (for the naive sampler:
    speed does not depend on the values)."""
    import transformers

    cfg = model.config
    d = dict(SHAPES[next(k for k, v in SHAPES.items() if v["architectures"][0] == cfg.arch
                         and v["hidden_size"] == cfg.dim and v["num_hidden_layers"] == cfg.n_layers)])
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
        from powersample_fast.graphs import DecodeGraphs

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
    x = torch.randint(0, 1000, (1, prompt_len), device=hf.device)
    with torch.inference_mode():
        hf.generate(x, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        synchronize(hf.device)
        t = time.perf_counter()
        hf.generate(x, max_new_tokens=n_tokens, min_new_tokens=n_tokens, do_sample=False)
        synchronize(hf.device)
    return (time.perf_counter() - t) / n_tokens


def mcmc_run(kind, model_or_hf, tok, prompts, n, settings, eos, cuda_graphs=False):
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
    synchronize(s.model.device if hasattr(s.model, "device") else "cpu")
    t = time.perf_counter()
    res = s.generate(prompts, n=n, progress=False, seed=0, **settings, **kw)
    synchronize(s.model.device)
    wall = time.perf_counter() - t
    sampled = sum(r.stats["tokens_sampled"] for r in res)
    prefilled = sum(r.stats["tokens_prefilled"] for r in res)
    return {"wall_s": wall, "samples": len(res), "tokens_sampled": sampled, "tokens_prefilled": prefilled,
            "tok_per_s": sampled / wall, "s_per_sample": wall / len(res),
            "acceptance": sum(r.accepted for r in res) / max(1, sum(r.proposed for r in res))}


def versions():
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:
        v["triton"] = None
    return v


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
    roof_s = (wb + kv_per_pos * avg_ctx) / bw
    hf_s = hf_decode(hf, args.decode_tokens)
    base = {"model": name, "device": device_name(dev), "dtype": str(model.dtype).replace("torch.", "")}
    if dev.type == "cuda":
        g_s, _ = plain_decode(model, args.decode_tokens, 1, graphs=True)
        rows.append(dict(base, kind="plain decode (ours + CUDA graphs, 1 row)", tok_per_s=1 / g_s, s_per_step=g_s,
                         roofline_s=roof_s, roofline_frac=roof_s / g_s))
    rows.append(dict(base, kind="plain decode (ours, 1 row)", tok_per_s=1 / step_s, s_per_step=step_s,
                     roofline_s=roof_s, roofline_frac=roof_s / step_s, copy_GBps=bw / 1e9))
    rows.append(dict(base, kind="plain decode (HF generate)", tok_per_s=1 / hf_s, s_per_step=hf_s,
                     roofline_frac=roof_s / hf_s))
    settings = dict(alpha=4.0, block_size=args.block_size, mcmc_steps=args.steps, max_new_tokens=args.naive_budget)
    eos = []  # random weights: disable EOS so every run has the same, full length
    naive = mcmc_run("naive", hf, tok, [prompt_ids], 1, settings, eos)
    rows.append(dict(base, kind="MCMC naive (HF generate per proposal), 1 chain", **settings, **naive))
    ours1 = mcmc_run("ours", model, tok, [prompt_ids], 1, settings, eos)
    rows.append(dict(base, kind="MCMC ours, 1 chain", **settings, **ours1,
                     speedup_wall=naive["s_per_sample"] / ours1["s_per_sample"],
                     speedup_tok_s=ours1["tok_per_s"] / naive["tok_per_s"]))
    for n in args.chains:
        if n == 1:
            continue
        r = mcmc_run("ours", model, tok, [prompt_ids], n, settings, eos)
        rows.append(dict(base, kind=f"MCMC ours, {n} chains", **settings, **r,
                         speedup_tok_s=r["tok_per_s"] / naive["tok_per_s"]))
    if dev.type == "cuda":  # the same runs with decode steps replayed from CUDA graphs
        for n in args.chains:
            r = mcmc_run("ours", model, tok, [prompt_ids], n, settings, eos, cuda_graphs=True)
            rows.append(dict(base, kind=f"MCMC ours + CUDA graphs, {n} chains", **settings, **r,
                             speedup_wall=naive["s_per_sample"] / r["s_per_sample"] if n == 1 else "",
                             speedup_tok_s=r["tok_per_s"] / naive["tok_per_s"]))


def write(rows, args, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    dev = rows[0]["device"] if rows else "unknown"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", dev).strip("-")
    meta = {"device": dev, "versions": versions(), "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / f"{slug}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = ["model", "kind", "max_new_tokens", "tok_per_s", "s_per_sample", "s_per_step", "speedup_wall",
            "speedup_tok_s", "roofline_frac", "acceptance", "tokens_prefilled"]
    lines = [f"# Benchmark on {dev}", "", f"- versions: {meta['versions']}", f"- command: `{meta['command']}`",
             f"- date: {meta['date']}", "- settings: alpha 4, block/steps/budget as in the columns; EOS disabled "
             "(random or fixed lengths); speedups relative to the naive sampler at the same settings", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    (out / f"{slug}.md").write_text("\n".join(lines) + "\n")
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
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    args.chains = [int(x) for x in args.chains.split(",")]
    rows = []
    if args.cpu_default:
        from transformers import AutoModelForCausalLM

        from powersample_fast.hub import default_model_dir

        d = default_model_dir()
        model, tok = pf.load(d, device="cpu", dtype=torch.float32)
        hf = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
        prompt = tok.apply_chat_template([{"role": "user", "content": "Explain why the sky is blue."}],
                                         add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        bench_model("SmolLM2-135M-Instruct (real weights)", model, hf, tok, prompt, args, rows)
    if args.gpu:
        if not torch.cuda.is_available():
            sys.exit("--gpu needs a CUDA device")
        for name in args.models.split(","):
            model = random_model(name, "cuda", torch.bfloat16)
            hf = hf_twin(model)
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
