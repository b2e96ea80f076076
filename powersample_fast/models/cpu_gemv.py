"""The one-row bf16 linear kernel (csrc/gemv_bf16.cpp): built once per machine, loaded on demand.

A 1-row bf16 decode step is ~85% weight reads through matrix-vector products; torch's gemv and
oneDNN's packed kernels read at ~14-16 GB/s on this project's 2-core machines, where the AVX512-BF16
kernel in csrc/gemv_bf16.cpp reads at ~24 GB/s (one 57 MB logits weight, 1 thread; see
benchmarks/results/cpu-decode.md). It is a torch op (torch.ops.powersample_fast.gemv_bf16), so a
traced CPU step records it like any aten op.

Built with the system C++ compiler ($CXX, else g++) against the installed torch's headers, the
first time a process needs it (~6-10 s, one stderr line says so), into
`<cache_home>/ext/<hash of source, torch version, flags>/` and loaded from there afterwards; two
processes building at once each write their own file and rename it into place. Used only where the
CPU has AVX512-BF16 (torch.cpu.get_capabilities). Anything that fails (no compiler, a compile
error, a load error) leaves the kernel off for the process with one stderr line, and one-row bf16
linears keep torch's gemv. POWERSAMPLE_FAST_GEMV_KERNEL=0 turns it off.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

KERNEL_ENV = "POWERSAMPLE_FAST_GEMV_KERNEL"
SOURCE = Path(__file__).resolve().parent / "csrc" / "gemv_bf16.cpp"
FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512bf16", "-w"]

_state: dict = {}  # "loaded": bool, "why": reason it is off (once decided for this process)


def cpu_has_avx512_bf16() -> bool:
    caps = getattr(torch.cpu, "get_capabilities", None)
    try:
        return bool(caps is not None and caps().get("avx512_bf16"))
    except Exception:  # noqa: BLE001 - an old torch: no kernel
        return False


def _library_path(cxx: str) -> Path:
    from .default_model import cache_home

    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join([cxx] + FLAGS).encode())
    return cache_home() / "ext" / key.hexdigest()[:16] / "gemv_bf16.so"


def _build(cxx: str, target: Path) -> None:
    torch_dir = Path(torch.__file__).resolve().parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.so")
    cmd = [cxx, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}",
           "-o", str(tmp), str(SOURCE),
           f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    print(f"powersample-fast: building the one-row bf16 kernel once (~10 s; cached in {target.parent})",
          file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{cxx} failed ({last})")
    os.replace(tmp, target)


def _load() -> Optional[str]:
    """Load (building it first where needed) the kernel; None, or why it stays off."""
    if os.environ.get(KERNEL_ENV, "1") == "0":
        return f"{KERNEL_ENV}=0"
    if not cpu_has_avx512_bf16():
        return "this CPU has no AVX512-BF16"
    if hasattr(torch.ops.powersample_fast, "gemv_bf16"):
        return None  # loaded by another path (another copy of this module)
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) to build it"
    try:
        target = _library_path(cxx)
        if not target.is_file():
            _build(cxx, target)
        torch.ops.load_library(str(target))
        torch.ops.powersample_fast.gemv_bf16  # noqa: B018 - raises if the library registered nothing
    except Exception as e:  # noqa: BLE001 - any failure: torch's gemv instead
        return f"{type(e).__name__}: {e}"
    return None


def gemv_kernel_ready() -> bool:
    """Whether one-row bf16 linears run csrc/gemv_bf16.cpp (decided, and built, on first call)."""
    if "loaded" not in _state:
        why = _load()
        _state.update(loaded=why is None, why=why)
        if why is not None and os.environ.get(KERNEL_ENV, "1") != "0" and cpu_has_avx512_bf16():
            print(f"powersample-fast: one-row bf16 kernel off ({why}); using torch's gemv",
                  file=sys.stderr, flush=True)
    return _state["loaded"]


def gemv_kernel_off_reason() -> Optional[str]:
    gemv_kernel_ready()
    return _state["why"]


def _reset_for_tests() -> None:
    _state.clear()


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bf16(x @ weight.T + bias) for one row x [..., K] (numel K) and a contiguous bf16 weight [N, K]."""
    return torch.ops.powersample_fast.gemv_bf16(x, weight, bias)
