"""The one device helper: library code never names a device literally."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import ConfigError

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def default_device() -> torch.device:
    """CUDA (current device) when available, else CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device) -> torch.device:
    """torch.device from a string/device, or the default; a clear error for unknown or unavailable ones."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"invalid device {device!r} ({e}); use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available to this torch "
                              f"({torch.__version__}); use device='cpu' or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise ConfigError(f"unsupported device type {dev.type!r}; use 'cpu' or 'cuda'")
    return dev


# Decode rows per batch when max_batch is not given: a GPU step costs about the same for 1 or 64
# rows; a CPU step's time grows with the rows, so a CPU batch stays small.
MAX_BATCH = {"cuda": 64, "cpu": 8}


def default_max_batch(device) -> int:
    return MAX_BATCH["cuda" if torch.device(device).type == "cuda" else "cpu"]


def resolve_max_batch(max_batch, device) -> int:
    """`max_batch` itself (an integer >= 1), or the device's default when None."""
    mb = default_max_batch(device) if max_batch is None else max_batch
    if not isinstance(mb, int) or isinstance(mb, bool) or mb < 1:
        raise ConfigError(f"max_batch must be an integer >= 1 (got {mb!r})")
    return mb


DTYPE_ENV = "POWERSAMPLE_FAST_DTYPE"


def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16), as torch reports
    them. Without them a bf16 matmul converts to fp32 and is slower than fp32 (measured on an
    AVX2-only EPYC: an 8-row decode step of the default model 2.2x slower in bf16)."""
    caps = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.13: cpuinfo's feature map
    if caps is not None:
        c = caps()
        return bool(c.get("avx512_bf16") or c.get("amx_bf16"))
    # older torch: torch.cpu._is_*_supported (2.4+), private, so each looked up with a default
    checks = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(f() for f in checks if f is not None)


def slow_dtype_note(device, dtype) -> Optional[str]:
    """A one-line warning when bfloat16 runs on a CPU without native bf16 matrix instructions (where
    batched decode steps are slower than in float32), else None."""
    if torch.device(device).type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16():
        return ("bfloat16 on this CPU has no native bf16 matrix instructions (AVX512-BF16/AMX), so its "
                "matmuls are emulated and a batch of chains runs slower than in float32; pass --dtype float32 "
                "for speed")
    return None


def default_dtype(device) -> torch.dtype:
    """The dtype a model loads in when none is given: bfloat16 on CUDA; on CPU bfloat16 where the CPU
    has native bf16 matrix instructions (`cpu_has_native_bf16`), float32 elsewhere. The environment
    variable POWERSAMPLE_FAST_DTYPE (float32 / bfloat16 / float16) overrides the choice on any
    device. Log-probs, normalisers and the MH arithmetic are fp32 in every dtype."""
    import os

    env = os.environ.get(DTYPE_ENV)
    if env:
        try:
            return resolve_dtype(env)
        except ConfigError:
            raise ConfigError(f"{DTYPE_ENV}={env!r} is not a supported dtype; use float32, bfloat16 or float16") from None
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if dev.type == "cpu" and cpu_has_native_bf16() else torch.float32


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        key = dtype.lower().replace("torch.", "")
        if key not in _DTYPES:
            raise ConfigError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")
        return _DTYPES[key]
    if dtype not in SUPPORTED_DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")
    return dtype


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def free_memory_bytes(device) -> int:
    """Memory free for new allocations on `device`: CUDA free memory, or available RAM on CPU
    (Linux sysconf; a large number where unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        # the caching allocator's reserved-but-unused blocks are free for us too
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + int(cached)
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-Linux
        return 1 << 60
