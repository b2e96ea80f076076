"""Command line: `powersample-fast sample --model default --prompt "..."`."""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext

from .errors import PowerSampleError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="powersample-fast", description="Exact, fast power sampling of LLMs (p^alpha via MCMC).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="power-sample one or more prompts")
    s.add_argument("--model", default="default", help="HF-format model directory, or 'default' (SmolLM2-135M-Instruct)")
    s.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several prompts)")
    s.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    s.add_argument("--alpha", type=float, default=4.0, help="power alpha (default 4)")
    s.add_argument("--steps", type=int, default=10, help="MH steps per block (default 10)")
    s.add_argument("--block-size", type=int, default=192, help="block size B (default 192)")
    s.add_argument("--max-new-tokens", type=int, default=3072, help="token budget T (default 3072)")
    s.add_argument("--temperature", type=float, default=None, help="proposal temperature (default 1/alpha)")
    s.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    s.add_argument("--top-k", type=int, default=None, help="restrict proposals to the top-k tokens (default off)")
    s.add_argument("--index", default="uniform", choices=["uniform", "last_block"], help="cut-index mode")
    s.add_argument("--max-batch", type=int, default=None, help="chains decoded together (default 64 CUDA / 8 CPU)")
    s.add_argument("--device", default=None, help="torch device (default: cuda if available else cpu)")
    s.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default bf16 on CUDA and on CPUs with native bf16, else fp32)")
    s.add_argument("--backend", default=None, choices=["auto", "triton", "torch"], help="kernel backend")
    s.add_argument("--cuda-graphs", action="store_true", help="replay decode steps from CUDA graphs (experimental)")
    s.add_argument("--json", action="store_true", help="print one JSON object per sample")
    s.add_argument("--stats", action="store_true", help="print time per phase and acceptance rate (stderr)")
    s.add_argument("--profile", metavar="TRACE.json", default=None, help="write a torch profiler (Chrome/Perfetto) trace")
    s.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (prefill/decode/sample/fork/accept) for Nsight")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _profiler(path, nvtx=False):
    import torch

    if nvtx:
        if not torch.cuda.is_available():
            print("powersample-fast: --nvtx ignored: NVTX ranges need CUDA", file=sys.stderr)
            return nullcontext()
        # record_function ranges become NVTX ranges for nsys / Nsight Systems
        return torch.autograd.profiler.emit_nvtx()
    if path is None:
        return nullcontext()

    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts, record_shapes=False)


def main(argv=None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.nvtx and args.profile:
        ap.error("--nvtx and --profile are exclusive: NVTX ranges are for Nsight (nsys), --profile writes a torch trace")
    try:
        from . import ops
        from .loader import load
        from .sampler import PowerSampler

        if args.backend:
            ops.set_backend(args.backend)
        model, tok = load(args.model, device=args.device, dtype=args.dtype)
        sampler = PowerSampler(model, tok, cuda_graphs=args.cuda_graphs)
        prof = _profiler(args.profile, args.nvtx)
        with prof:
            results = sampler.generate(
                args.prompt, alpha=args.alpha, max_new_tokens=args.max_new_tokens, block_size=args.block_size,
                mcmc_steps=args.steps, proposal_temperature=args.temperature, top_k=args.top_k, index=args.index,
                n=args.n, seed=args.seed, chat=args.chat, progress=not args.no_progress, max_batch=args.max_batch,
            )
        if args.profile and hasattr(prof, "export_chrome_trace"):
            prof.export_chrome_trace(args.profile)
            print(f"profile trace written to {args.profile}", file=sys.stderr)
    except PowerSampleError as e:
        print(f"powersample-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("powersample-fast: interrupted", file=sys.stderr)
        return 130
    for r in results:
        if args.json:
            print(json.dumps(r.to_dict()))
        else:
            head = f"--- prompt {r.prompt_index} sample {r.sample_index}: {len(r.token_ids)} tokens, " \
                   f"accepted {r.accepted}/{r.proposed}, {'EOS' if r.finished_by_eos else 'budget'} ---"
            print(head)
            print(r.text)
    if args.stats:
        st = sampler.last_stats
        print("stats: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in st.items()),
              file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
