"""CLI checks that run before the model loads (cheap, no torch unless said), and the profiler context."""
from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

from .errors import ConfigError


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def default_threads(cores: Optional[int] = None) -> Optional[int]:
    """torch intra-op threads for the CLI: 1 on machines with <= 2 usable cores, else None (torch's
    own default, one per physical core). Measured on this project's shared 2-core machine with
    SmolLM2-135M: one decode step took 54-56 ms with 1 thread and 61-198 ms with 2 (one row), and
    95-110 ms vs 480-990 ms for two rows, as soon as another process used a core."""
    cores = usable_cores() if cores is None else cores
    return 1 if cores <= 2 else None


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
    existed = p.exists()
    try:  # the real test (permissions, read-only file systems): open for writing, leave nothing behind
        with open(p, "a"):
            pass
        if not existed:
            p.unlink()
    except OSError as e:
        raise ConfigError(f"--profile {path} is not writable ({e.strerror}); choose a path in a writable "
                          "directory") from None


def check_backend(backend: Optional[str], device) -> None:
    """--backend triton (or POWERSAMPLE_FAST_BACKEND=triton) needs CUDA tensors, or Triton's CPU
    interpreter (TRITON_INTERPRET=1, set before start; slow, for testing), and triton installed."""
    name = (backend or os.environ.get("POWERSAMPLE_FAST_BACKEND", "auto")).lower()
    if name != "triton":
        return
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        raise ConfigError("--backend triton: triton is not installed; pip install triton, or use --backend torch")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"--backend triton runs Triton kernels on CUDA tensors, but the device is {device}; "
                          "use --backend torch (or auto) on CPU, or set TRITON_INTERPRET=1 to run the kernels "
                          "in Triton's slow CPU interpreter")


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
