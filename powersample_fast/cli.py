"""Command line: `powersample-fast sample --model default --prompt "..."`.

Order of work, cheapest checks first: arguments and sampling parameters (no torch), the --profile
path, then torch (threads, device, dtype, backend), the model's config.json (context length), the
tokenizer and the prompts' lengths, and only then the weights. Every heavy import happens inside
`main`'s try, so Ctrl-C at any point prints one line and exits 130.
"""
from __future__ import annotations

import argparse
import sys

from . import __version__
from .cli_setup import add_engine_args
from .errors import PowerSampleError


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="powersample-fast", description="Exact, fast power sampling of LLMs (p^alpha via MCMC).")
    ap.add_argument("--version", action="version", version=f"powersample-fast {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="power-sample one or more prompts")
    s.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several prompts)")
    chat = s.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap each prompt in the model's chat template (default: when the tokenizer has one)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="give the raw prompt text to the model")
    s.add_argument("--alpha", type=float, default=4.0, help="power alpha (default 4)")
    s.add_argument("--steps", type=int, default=10, help="MH steps per block (default 10)")
    s.add_argument("--block-size", type=int, default=192, help="block size B (default 192)")
    s.add_argument("--max-new-tokens", type=int, default=3072, help="token budget T (default 3072)")
    s.add_argument("--temperature", type=float, default=None, help="proposal temperature (default 1/alpha)")
    s.add_argument("--n", type=int, default=1, help="samples per prompt (default 1)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed with --json)")
    s.add_argument("--top-k", type=int, default=None, help="restrict proposals to the top-k tokens (default off)")
    s.add_argument("--index", default="uniform", choices=["uniform", "last_block"], help="cut-index mode")
    add_engine_args(s, model_help="HF-format model directory, or 'default' (SmolLM2-135M-Instruct)",
                    device_help="torch device (default: cuda if available else cpu)",
                    max_len=False)
    s.add_argument("--backend", default=None, choices=["auto", "triton", "torch"], help="kernel backend")
    m = s.add_argument_group("methods", "power-sampling method and its parameters (defaults: the papers')")
    m.add_argument("--method", default=None, choices=["plain", "mh", "smc", "sps"],
                   help="mh: Algorithm 1 (default); smc: Power-SMC; sps: Scalable Power Sampling; plain: ancestral")
    m.add_argument("--particles", type=int, default=None, help="smc: particles N per sample (default 64)")
    m.add_argument("--ess-threshold", type=float, default=None, help="smc: resample when ESS < this * N (default 0.5)")
    m.add_argument("--resample-every", type=int, default=None, help="smc: ESS check every this many tokens (default 1)")
    m.add_argument("--alpha-ramp-tokens", type=int, default=None, help="smc: ramp the exponent 1 -> alpha over this many tokens (default 0: off)")
    m.add_argument("--return-all", action="store_true", default=None, help="smc: all particles and weights in --json")
    m.add_argument("--sps-top-k", type=int, default=None, help="sps: candidates K per token (default 8)")
    m.add_argument("--sps-rollouts", type=int, default=None, help="sps: rollouts M per candidate (default 8)")
    m.add_argument("--sps-horizon", type=int, default=None, help="sps: rollout length H (default 192)")
    s.add_argument("--json", action="store_true", help="print one JSON object per sample (inputs included)")
    s.add_argument("--stats", action="store_true",
                   help="print time per phase and acceptance rate (stderr; with --json a last {\"stats\": ...} line)")
    s.add_argument("--profile", metavar="TRACE.json", default=None, help="write a torch profiler (Chrome/Perfetto) trace")
    s.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (prefill/decode/sample/fork/accept) for Nsight")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    from . import batch, server  # `serve` and `run`: each module owns its parser and main

    server.add_parser(sub)
    batch.add_parser(sub)
    return ap


METHOD_FLAGS = ("method", "particles", "ess_threshold", "resample_every", "alpha_ramp_tokens", "return_all",
                "sps_top_k", "sps_rollouts", "sps_horizon")  # passed to generate only when given


class _SigintFlag:
    """Records that Ctrl-C was pressed (then raises KeyboardInterrupt as Python's own handler does):
    some libraries turn the KeyboardInterrupt into their own error (transformers' lazy imports raise
    "Could not import module ..."), and that must still end as an interrupt, not as an error."""

    def __init__(self):
        self.hit, self._saved = False, None

    def _handler(self, signum, frame):
        self.hit = True
        raise KeyboardInterrupt

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._saved = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            import signal

            signal.signal(signal.SIGINT, self._saved)


def main(argv=None) -> int:
    with _SigintFlag() as ctrl_c:
        try:
            return _main(argv)
        except KeyboardInterrupt:
            pass
        except PowerSampleError as e:
            if not ctrl_c.hit:
                print(f"powersample-fast: error: {e}", file=sys.stderr)
                return 2
        except Exception:
            if not ctrl_c.hit:
                raise
    print("powersample-fast: interrupted", file=sys.stderr)
    return 130


def _main(argv) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.cmd in ("serve", "run"):
        return args.func(args)
    if args.nvtx and args.profile:
        ap.error("--nvtx and --profile are exclusive: NVTX ranges are for Nsight (nsys), --profile writes a torch trace")
    return _sample(args)


def _sample(args) -> int:
    from .cli_setup import check_engine_args, check_profile_path
    from .params import SamplingParams, resolve_seed

    method_kw = {k: getattr(args, k) for k in METHOD_FLAGS if getattr(args, k) is not None}
    p = SamplingParams(alpha=args.alpha, max_new_tokens=args.max_new_tokens, block_size=args.block_size,
                       mcmc_steps=args.steps, proposal_temperature=args.temperature, top_k=args.top_k,
                       index=args.index, n=args.n, seed=resolve_seed(args.seed), **method_kw)
    check_engine_args(args)
    check_profile_path(args.profile)

    import torch  # heavy imports from here on (inside main's KeyboardInterrupt handler)

    from . import cli_output as out
    from .cli_setup import apply_threads, check_backend, check_prompts, note_slow_dtype, profiler
    from .device import default_dtype, resolve_device, resolve_dtype

    apply_threads(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype) if args.dtype is not None else default_dtype(device)
    check_backend(args.backend, device)
    from . import ops
    from .loader import attach_tokenizer_eos, load_model, resolve_model_dir

    if args.backend:
        ops.set_backend(args.backend)
    model_dir = resolve_model_dir(args.model)
    tok, chat = check_prompts(model_dir, args.prompt, args.chat, p.max_new_tokens)
    model = load_model(model_dir, device=device, dtype=dtype)
    note_slow_dtype(model)
    attach_tokenizer_eos(model, tok)
    from .sampler import PowerSampler

    sampler = PowerSampler(model, tok, cuda_graphs=args.cuda_graphs)
    max_batch = args.max_batch or (64 if device.type == "cuda" else 8)
    chains = len(args.prompt) * p.n
    step_s = out.time_decode_step(model, min(max_batch, chains))
    out.stderr_line(out.announce(out.model_label(args.model, model_dir), p, len(args.prompt), chat, device, dtype,
                                 torch.get_num_threads() if device.type == "cpu" else None, max_batch, step_s))
    prof = profiler(args.profile, args.nvtx)
    with prof:
        results = sampler.generate(
            args.prompt, alpha=p.alpha, max_new_tokens=p.max_new_tokens, block_size=p.block_size,
            mcmc_steps=p.mcmc_steps, proposal_temperature=p.proposal_temperature, top_k=p.top_k, index=p.index,
            n=p.n, seed=p.seed, chat=chat, progress=not args.no_progress, max_batch=args.max_batch, **method_kw,
        )
    info = out.run_info(args, p, chat, model_dir, device, dtype) if args.json else None
    out.print_results(results, args, info)
    if args.stats:
        out.print_stats(sampler.last_stats, args.json)
    if args.profile and hasattr(prof, "export_chrome_trace"):
        out.write_profile(prof, args.profile)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
