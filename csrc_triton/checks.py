"""Input checks shared by the kernel launchers of this package (Liger's ops/utils.py): each names
the argument, its shape and dtype, so a bad call fails with a message instead of a kernel fault."""
from __future__ import annotations

import numbers
import os
from typing import Optional, Sequence

import torch

from powersample_fast.errors import ConfigError

# Read once, when this package is imported: triton reads the variable when it decorates the kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, ndim: int, dtypes: Optional[Sequence[torch.dtype]] = None,
                 device: Optional[torch.device] = None, device_of: str = "") -> torch.Tensor:
    """Raise ConfigError unless ``t`` is a tensor with ``ndim`` dims, a dtype in ``dtypes`` and on
    ``device``. The message names the argument, its shape and dtype."""
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ConfigError(
            f"{name} must be {ndim}-D, got shape {tuple(t.shape)} (dtype {t.dtype})")
    if dtypes is not None and t.dtype not in dtypes:
        raise ConfigError(
            f"{name} must have dtype {_dtype_names(dtypes)}, got {t.dtype} (shape {tuple(t.shape)})")
    if device is not None and t.device != device:
        raise ConfigError(f"{name} is on {t.device} but {device_of} is on {device}: "
                          "move all arguments to one device")
    return t


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int], what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ConfigError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(t.shape)}")


def check_device(device: torch.device, name: str) -> None:
    """Kernels run on GPUs, or on CPU tensors only under the Triton interpreter."""
    if device.type == "cpu" and not INTERPRET:
        raise ConfigError(
            f"{name} is a CPU tensor: the Triton kernels run on CPU only with TRITON_INTERPRET=1 "
            "set before csrc_triton is imported; use powersample_fast.ops (torch reference) instead")


def check_positive_float(name: str, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ConfigError(f"{name} must be a python float, got {type(x).__name__}")
    x = float(x)
    if not (x > 0.0 and x < float("inf")):
        raise ConfigError(f"{name} must be finite and > 0, got {x}")
    return x
