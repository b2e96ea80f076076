"""CLI checks that run before the model loads (cheap, no torch unless said), and the profiler context."""
from __future__ import annotations

import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

from ...errors import ConfigError


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def others_cpu_use(cpus, window: float = 0.2) -> Optional[float]:
    """Cores' worth of CPU time that other processes used on `cpus` over `window` seconds (this
    process sleeps meanwhile), from /proc/stat; None where that is unreadable (not Linux)."""
    def read():
        rows = {}
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3:4].isdigit():
                    name, *ticks = line.split()
                    rows[int(name[3:])] = [int(t) for t in ticks[:8]]  # user .. steal
        return rows

    try:
        a = read()
        time.sleep(window)
        b = read()
    except (OSError, ValueError):
        return None
    used = 0.0
    for c in cpus:
        if c in a and c in b:
            d = [y - x for x, y in zip(a[c], b[c])]
            total, idle = sum(d), d[3] + d[4]  # idle + iowait
            used += (total - idle) / total if total > 0 else 0.0
    return used


def default_threads(cores: Optional[int] = None, others: Optional[float] = None) -> Optional[int]:
    """torch intra-op threads for the CLI: 1 on a machine with <= 2 usable cores where other
    processes use at least half a core right now (`others_cpu_use`), else None (torch's default,
    one per physical core). Measured with SmolLM2-135M on a 2-core machine: idle, a one-row decode
    step takes 49 ms with 2 threads and 89 ms with 1; with another process on a core it took
    61-198 ms with 2 and 54-56 ms with 1 (two rows: 480-990 ms vs 95-110 ms), as torch's threads
    wait on the busy core. Measured now, not from the load average: the 1-minute average still
    counts a run that just ended, so a second run in a row would get one thread on an idle machine."""
    cores = usable_cores() if cores is None else cores
    if cores > 2:
        return None
    if others is None:
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - non-Linux
            cpus = list(range(cores))
        others = others_cpu_use(cpus)
        if others is None:  # pragma: no cover - no /proc/stat
            return None
    return 1 if others >= 0.5 else None


DTYPE_HELP = "float32 | bfloat16 | float16 (default bf16 on CUDA and on CPUs with native bf16, else fp32)"


def add_engine_args(p, *, model_help: str, device_help: str, max_len: bool = True) -> None:
    """The flags `sample`, `serve` and `run` share: model, batch, device, dtype, KV row length,
    threads, CUDA graphs, kernel backend (checked by `check_engine_args`, threads set by
    `apply_threads`, the backend by `apply_backend`)."""
    p.add_argument("--model", default="default", help=model_help)
    p.add_argument("--max-batch", type=int, default=None, help="chains decoded together (default 64 CUDA / 8 CPU: device.MAX_BATCH)")
    p.add_argument("--device", default=None, help=device_help)
    p.add_argument("--dtype", default=None, help=DTYPE_HELP)
    if max_len:
        p.add_argument("--max-len", type=int, default=None,
                       help="positions per KV row, prompt + new tokens (default: the model's context)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on a busy machine with <= 2 cores, else torch's default)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay decode steps from CUDA graphs (experimental)")
    p.add_argument("--backend", default=None, choices=["auto", "triton", "torch"],
                   help="kernel backend (default: POWERSAMPLE_FAST_BACKEND, else auto: Triton on CUDA, torch on CPU)")


def check_engine_args(args) -> None:
    """The integer flags of `add_engine_args` are >= 1 (before anything loads)."""
    for name in ("max_batch", "max_len", "threads"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1 (got {v})")


def note_slow_dtype(model) -> None:
    """One stderr line when the loaded model's dtype is slow on its device (`device.slow_dtype_note`)."""
    from ...device import slow_dtype_note

    note = slow_dtype_note(model.device, model.dtype)
    if note:
        print(f"powersample-fast: note: {note}", file=sys.stderr)


def apply_threads(args) -> None:
    """Set torch's CPU threads: --threads, at most one per usable core (more only wait on each other:
    10000 threads made a decode step 20x slower), else `default_threads()` (imports torch)."""
    import torch

    threads = args.threads or default_threads()
    if args.threads and args.threads > usable_cores():
        threads = usable_cores()
        print(f"powersample-fast: note: --threads {args.threads} capped to {threads}, the number of CPU cores "
              "this process may use", file=sys.stderr)
    if threads:
        torch.set_num_threads(threads)


def cannot_write(p: Path) -> Optional[str]:
    """Why file p cannot be written (None: it can): the real test (permissions, read-only file
    systems) is opening it for appending; a file this creates is removed again."""
    existed = p.exists()
    try:
        with open(p, "a", encoding="utf-8"):
            pass
        if not existed:
            p.unlink()
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_profile_path(path: Optional[str]) -> None:
    """--profile must name a file we can create: its directory exists and is writable, and it is not
    itself a directory. Checked before sampling, so a long run is not lost to a bad path."""
    if path is None:
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise ConfigError(f"--profile {path} is a directory; give a file name such as {p / 'trace.json'}")
    if not parent.is_dir():
        raise ConfigError(f"--profile {path}: directory {parent} does not exist; create it or choose another path")
    why = cannot_write(p)
    if why is not None:
        raise ConfigError(f"--profile {path} is not writable ({why}); choose a path in a writable directory")


def check_backend(backend: Optional[str], device) -> None:
    """--backend triton (or POWERSAMPLE_FAST_BACKEND=triton) needs CUDA tensors, or Triton's CPU
    interpreter (TRITON_INTERPRET=1, set before start; slow, for testing), and triton installed."""
    forced = backend not in (None, "auto")  # as ops.backend_for: a forced backend, else the variable
    name = (backend if forced else os.environ.get("POWERSAMPLE_FAST_BACKEND", "auto")).lower()
    if name != "triton":
        return
    flag = "--backend triton" if forced else "POWERSAMPLE_FAST_BACKEND=triton"
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise ConfigError(f"{flag}: triton is not installed; pip install triton, or use --backend torch")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"{flag} runs Triton kernels on CUDA tensors, but the device is {device}; "
                          "use --backend torch (or auto) on CPU, or set TRITON_INTERPRET=1 to run the kernels "
                          "in Triton's slow CPU interpreter")


def apply_backend(args, device) -> None:
    """--backend: checked against the device (`check_backend`), then set for the process."""
    check_backend(args.backend, device)
    if args.backend:
        from ... import ops

        ops.set_backend(args.backend)

def check_prompts(model_dir, prompts, chat_flag, max_new_tokens: int):
    """Before the weights load: the budget and each prompt against the context length in config.json
    (cheap to read), with the tokenizer and chat template the run will use. Returns (tokenizer, chat).
    A model_dir that is not a directory is left to load_model, which says what is wrong with it."""
    if not Path(model_dir).is_dir():
        return None, False
    from ...models.loader import read_config
    from ...models.tokenizer import load_tokenizer
    from ...prompts import normalize_prompts, use_chat

    ctx = read_config(model_dir).get("max_position_embeddings")
    ctx = ctx if isinstance(ctx, int) else None  # config_check validates it when the model loads
    if ctx is not None and max_new_tokens >= ctx:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                          f"context of {ctx} tokens; lower --max-new-tokens")
    tok = load_tokenizer(model_dir)
    if tok is None:
        raise ConfigError(f"{model_dir} has no tokenizer files (tokenizer.json or tokenizer_config.json); "
                          "the CLI needs one to encode --prompt text")
    chat = use_chat(tok, chat_flag)
    for i, ids in enumerate(normalize_prompts(prompts, tok, chat=chat)):
        if ctx is not None and len(ids) + max_new_tokens > ctx:
            raise ConfigError(f"prompt {i} has {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that "
                              f"exceeds the model's context of {ctx} tokens; shorten the prompt or lower "
                              "--max-new-tokens")
    return tok, chat


def profiler(path, nvtx=False):
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
