"""Command line: `powersample-fast sample --model default --prompt "..."`.

Order of work, cheapest checks first: arguments and sampling parameters (no torch), the --profile
path, then torch (threads, device, dtype, backend), the model's config.json (context length), the
tokenizer and the prompts' lengths, and only then the weights. Every heavy import happens inside
`main`'s try, so Ctrl-C at any point prints one line and exits 130.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from ... import __version__
from .sampling_flags import add_sampling_args, sampling_args
from .startup import add_engine_args
from ...errors import ConfigError, PowerSampleError


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
    add_engine_args(s, model_help="HF-format model directory, or 'default' (SmolLM2-135M-Instruct)",
                    device_help="torch device (default: cuda if available else cpu)",
                    max_len=False)
    add_sampling_args(s)
    s.add_argument("--allow-long", action="store_true",
                   help="run work over the limits: more than 1e9 planned decode tokens, or an expected time over "
                        "24 h (refused by default)")
    s.add_argument("--json", action="store_true", help="print one JSON object per sample (inputs included)")
    s.add_argument("--stats", action="store_true",
                   help="print time per phase and acceptance rate (stderr; with --json a last {\"stats\": ...} line)")
    s.add_argument("--profile", metavar="TRACE.json", default=None, help="write a torch profiler (Chrome/Perfetto) trace")
    s.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (prefill/decode/sample/fork/accept) for Nsight")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    from ..batch import runner as batch  # `serve` and `run`: each module owns its parser and main
    from ..openai import server

    server.add_parser(sub)
    batch.add_parser(sub)
    return ap


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


def check_argv_text(prompts) -> None:
    """--prompt must be text: bytes that are not valid in the locale's encoding reach Python as lone
    surrogates (U+DC80..U+DCFF stand for bytes 0x80..0xFF), which no tokenizer can encode."""
    for i, text in enumerate(prompts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            c = ord(text[e.start])
            what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"a lone surrogate U+{c:04X}"
            raise ConfigError(f"--prompt {i} is not valid text ({what} at character {e.start}); pass UTF-8 text "
                              f"(check the terminal's encoding, or convert it with iconv)") from None


def _sample(args) -> int:
    from .startup import check_engine_args, check_profile_path
    from ...sampling_params import SamplingParams, resolve_seed
    from ..work_limits import check_work

    check_argv_text(args.prompt)
    p = SamplingParams(**dict(sampling_args(args), seed=resolve_seed(args.seed)))
    check_engine_args(args)
    check_work(p, len(args.prompt), allow_long=args.allow_long, override="--allow-long")
    check_profile_path(args.profile)

    import torch  # heavy imports from here on (inside main's KeyboardInterrupt handler)

    from . import output as out
    from .startup import apply_backend, apply_threads, check_prompts, note_slow_dtype, profiler
    from ...device import default_dtype, resolve_device, resolve_dtype, resolve_max_batch

    apply_threads(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype) if args.dtype is not None else default_dtype(device)
    apply_backend(args, device)
    from ...models.loader import load_model, resolve_model_dir
    from ...models.tokenizer import attach_tokenizer_eos

    from ...models import cpu_kernels

    cpu_kernels.prepare_in_background(device, dtype)  # a first-time build overlaps the model's
    model_dir = resolve_model_dir(args.model)
    tok, chat = check_prompts(model_dir, args.prompt, args.chat, p.max_new_tokens)
    model = load_model(model_dir, device=device, dtype=dtype)
    note_slow_dtype(model)
    attach_tokenizer_eos(model, tok)
    from ...api import PowerSampler

    sampler = PowerSampler(model, tok, cuda_graphs=args.cuda_graphs)
    max_batch = resolve_max_batch(args.max_batch, device)
    chains = len(args.prompt) * p.n
    from ..work_limits import step_rows

    step_s = out.time_decode_step(model, step_rows(p, chains, max_batch)[0])  # a step of the run's rows
    out.check_expected_time(p, chains, max_batch, step_s, args.allow_long)
    out.stderr_line(out.announce(out.model_label(args.model, model_dir), p, len(args.prompt), chat, device, dtype,
                                 torch.get_num_threads() if device.type == "cpu" else None, max_batch, step_s))
    prof = profiler(args.profile, args.nvtx)
    with prof:
        results = sampler.generate(args.prompt, chat=chat, progress=not args.no_progress, max_batch=args.max_batch,
                                   **({"allow_long": True} if args.allow_long else {}), **dataclasses.asdict(p))
    info = out.run_info(args, p, chat, model_dir, device, dtype) if args.json else None
    out.print_results(results, args, info)
    if args.stats:
        out.print_stats(sampler.last_stats, args.json)
    if args.profile and hasattr(prof, "export_chrome_trace"):
        out.write_profile(prof, args.profile)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
