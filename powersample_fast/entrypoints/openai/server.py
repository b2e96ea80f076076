"""`powersample-fast serve`: an OpenAI-compatible HTTP server over one running engine.

One background thread owns the engine (it is not thread-safe) and loops: take new requests and aborts
from a thread-safe inbox, run one `engine.step()`, hand each `RequestOutput` to its handler through
`loop.call_soon_threadsafe`. So requests from many clients join the running decode batch between
steps (continuous batching), and a client that goes away has its request aborted (its rows freed).
The app and its routes are in app.py (bodies are parsed and tokenized on one worker thread,
never on the event loop), the guards (host, API key, Content-Type, body size) in guards.py,
one request's life in call.py. Needs the `serve` extra (FastAPI + uvicorn).
"""
import logging
import os
import signal
import sys
import time

from . import protocol as proto
from ..cli.startup import add_engine_args, apply_backend, apply_threads, check_engine_args, note_slow_dtype
from .worker import EngineWorker
from ...errors import ConfigError
from .app import build_app  # noqa: F401  (the app; re-exported for callers of server.build_app)
from .guards import exposure_warning

log = logging.getLogger("powersample_fast.server")
GRACE_S = 3.0  # after SIGTERM/SIGINT: how long uvicorn waits for responses to finish (they are aborted at once)
JOIN_S = 5.0  # then how long the engine thread may take to finish its step


def add_parser(subparsers):
    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (needs the [serve] extra)")
    add_engine_args(s, model_help="HF-format model directory, or 'default'",
                    device_help="torch device (default: cuda if available else cpu)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--max-pending", type=int, default=256,
                   help="chains (prompts x n) queued or running before new requests get 503 (default 256)")
    s.add_argument("--served-model-name", default=None, help="name in /v1/models (default: the --model value)")
    s.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    g = s.add_argument_group("limits and security", "see the README's server section for the defaults' reasons")
    g.add_argument("--api-key", default=os.environ.get("POWERSAMPLE_FAST_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $POWERSAMPLE_FAST_API_KEY, else none)")
    g.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also accept this Host header (repeat; '*': any). Default: localhost, 127.0.0.1, [::1], --host")
    g.add_argument("--max-body", default="4MiB", help="largest request body, bytes or with k/M suffix (default 4MiB)")
    g.add_argument("--max-n", type=int, default=64, help="largest n (samples per prompt) a request may ask (default 64)")
    g.add_argument("--max-mcmc-steps", type=int, default=100, help="largest mcmc_steps a request may ask (default 100)")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may run (queue included) before it is aborted; 0: no limit (default 600)")
    s.set_defaults(func=main)
    return s


def parse_size(text: str) -> int:
    """'4194304', '4MiB', '4M', '512k', '512KB' -> bytes (k/M/G: powers of 1024)."""
    t = str(text).strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if mult > 1 else t) * mult)
    except (ValueError, OverflowError):
        raise ConfigError(f"--max-body must be a size in bytes such as 4194304 or 4MiB (got {text!r})") from None


def check_serve_args(args) -> None:
    """`serve`'s own flags, one ConfigError line each, before anything loads."""
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535 (got {args.port})")
    for flag, v, lo in (("--max-pending", args.max_pending, 1), ("--max-n", args.max_n, 1),
                        ("--max-mcmc-steps", args.max_mcmc_steps, 0)):
        if v < lo:
            raise ConfigError(f"{flag} must be an integer >= {lo} (got {v})")
    if not 1024 <= parse_size(args.max_body):
        raise ConfigError(f"--max-body must be at least 1024 bytes (got {args.max_body})")
    if not 0 <= args.request_timeout < float("inf"):
        raise ConfigError(f"--request-timeout must be a number of seconds >= 0 (got {args.request_timeout})")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key is empty; give a key, or leave the flag out for no key")


def main(args) -> int:
    try:
        import uvicorn
    except ImportError:
        print("powersample-fast serve needs FastAPI and uvicorn: pip install 'powersample-fast[serve]'", file=sys.stderr)
        return 2
    check_engine_args(args)
    check_serve_args(args)
    warning = exposure_warning(args.host, args.api_key, args.allow_host)
    if warning:
        print(f"powersample-fast: warning: {warning}", file=sys.stderr, flush=True)
    apply_threads(args)
    from ...device import resolve_device
    from ...engine import Engine

    apply_backend(args, resolve_device(args.device))
    from ...models.loader import load

    model, tok = load(args.model, device=args.device, dtype=args.dtype)
    note_slow_dtype(model)
    engine = Engine(model, tok, max_batch=args.max_batch, max_len=args.max_len,
                    cuda_graphs=args.cuda_graphs)
    name = args.served_model_name or args.model
    worker = EngineWorker(engine, max_pending=args.max_pending)
    context = min(engine.max_len, model.config.max_seq_len)
    limits = proto.Limits(max_n=args.max_n, max_mcmc_steps=args.max_mcmc_steps, max_chains=args.max_pending,
                          token_chars=proto.max_token_chars(tok))
    app = build_app(worker, tok, name, context, limits=limits, request_timeout=args.request_timeout,
                    guards=dict(bind_host=args.host, allow_hosts=args.allow_host, api_key=args.api_key,
                                max_body=parse_size(args.max_body)))
    server = _server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    timeout_graceful_shutdown=GRACE_S), worker)
    print(f"powersample-fast: serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    server.run()
    log.info("served for %.0f s", time.perf_counter() - t0)
    _finish(worker)
    return 0


def _finish(worker: EngineWorker) -> None:
    """After uvicorn: stop the engine thread before the interpreter goes (a thread inside a torch op at
    exit aborts the process). A signal now, or a thread that does not stop, ends the process at once."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_now)
    worker.shutdown()
    if not worker.join(JOIN_S):
        print(f"powersample-fast: the engine thread did not stop within {JOIN_S:g} s; exiting", file=sys.stderr)
        _exit_now()


def _exit_now(*_):
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _server(config, worker: EngineWorker):
    """uvicorn's server, but a signal aborts the requests in flight at once (`worker.shutdown`) instead
    of waiting for them, a second signal of either kind ends the process at once (after the engine
    thread's current step, at most 1 s), and the exit status is 0 (uvicorn re-raises the signals its
    handler recorded; this one records none)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if self.should_exit:
                worker.join(1.0)
                _exit_now()
            self.should_exit = True
            worker.shutdown()

    return Server(config)
