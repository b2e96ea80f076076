"""The bf16 CPU kernels of csrc/ (built once per machine, loaded on demand): the one-row gemv
(csrc/gemv_bf16.cpp) and the fused element-wise ops of a decoder layer (csrc/fused_bf16.cpp).

A 1-row bf16 decode step of a small model is weight reads through matrix-vector products plus
~1500 tiny element-wise ops. torch's gemv and oneDNN's packed kernels read weights at ~14-16 GB/s on
this project's 2-core machines, the AVX512-BF16 gemv at ~20-25 GB/s; the fused ops replace RMSNorm
(8 ops), RoPE (~10) and SiLU-and-multiply (~4) by one op each, and SDPA of a decode step (a few
query rows per kv head, where its CPU kernels spend ~60 us a call on set-up) by a direct loop. Numbers: benchmarks/results/cpu-decode.md.
They are torch ops (torch.ops.powersample_fast.*), so a traced CPU step records them like aten ops.

Built with the system C++ compiler ($CXX, else g++) against the installed torch's headers, the
first time a process needs them (~10-20 s, one stderr line says so), into
`<cache_home>/ext/<hash of sources, torch version, flags>/` and loaded from there afterwards; two
processes building at once each write their own file and rename it into place. Used only where the
CPU has AVX512-BF16 (torch.cpu.get_capabilities). Anything that fails (no compiler, a compile
error, a load error) leaves them off for the process with one stderr line: one-row bf16 linears
keep torch's gemv and the layers their aten ops. POWERSAMPLE_FAST_CPU_KERNELS=0 turns them off.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

import torch

KERNEL_ENV = "POWERSAMPLE_FAST_CPU_KERNELS"
SOURCES = [Path(__file__).resolve().parent / "csrc" / name for name in ("gemv_bf16.cpp", "fused_bf16.cpp")]
FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512bf16", "-w"]

_state: dict = {}  # "loaded": bool, "why": reason they are off (once decided for this process)
_lock = threading.Lock()  # one decision (and build) per process, also with `prepare_in_background`
_FUSED = True  # layers use the fused ops where loaded (set_fused_ops)


def cpu_has_avx512_bf16() -> bool:
    caps = getattr(torch.cpu, "get_capabilities", None)
    try:
        return bool(caps is not None and caps().get("avx512_bf16"))
    except Exception:  # noqa: BLE001 - an old torch: no kernels
        return False


def _library_path(cxx: str) -> Path:
    from .default_model import cache_home

    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + torch.__version__.encode()
                         + " ".join([cxx] + FLAGS).encode())
    return cache_home() / "ext" / key.hexdigest()[:16] / "powersample_cpu.so"


def _build(cxx: str, target: Path) -> None:
    torch_dir = Path(torch.__file__).resolve().parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.tmp.so")
    cmd = [cxx, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}", "-o", str(tmp),
           *map(str, SOURCES), f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    print(f"powersample-fast: building the bf16 CPU kernels once (~15 s; cached in {target.parent})",
          file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{cxx} failed ({last})")
    os.replace(tmp, target)


def _load() -> Optional[str]:
    """Load (building it first where needed) the kernel library; None, or why it stays off."""
    if os.environ.get(KERNEL_ENV, "1") == "0":
        return f"{KERNEL_ENV}=0"
    if not cpu_has_avx512_bf16():
        return "this CPU has no AVX512-BF16"
    if hasattr(torch.ops.powersample_fast, "gemv_bf16"):
        return None  # loaded by another path (another copy of this module)
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) to build them"
    try:
        target = _library_path(cxx)
        if not target.is_file():
            _build(cxx, target)
        torch.ops.load_library(str(target))
        torch.ops.powersample_fast.gemv_bf16  # noqa: B018 - raises if the library registered nothing
    except Exception as e:  # noqa: BLE001 - any failure: torch's ops instead
        return f"{type(e).__name__}: {e}"
    return None


def kernels_ready() -> bool:
    """Whether the kernels are loaded (decided, and built, on first call)."""
    if "loaded" not in _state:
        with _lock:
            if "loaded" not in _state:
                why = _load()
                if why is not None and os.environ.get(KERNEL_ENV, "1") != "0" and cpu_has_avx512_bf16():
                    print(f"powersample-fast: bf16 CPU kernels off ({why}); using torch's ops",
                          file=sys.stderr, flush=True)
                _state.update(loaded=why is None, why=why)
    return _state["loaded"]


def prepare_in_background(device, dtype) -> None:
    """Start deciding (and, the first time on a machine, building) the kernels on a thread, so a
    build overlaps the model's loading; `kernels_ready` waits for it. Only for bf16 on CPU."""
    if "loaded" in _state or "started" in _state or torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return
    _state["started"] = True
    threading.Thread(target=kernels_ready, name="powersample-cpu-kernels", daemon=True).start()


def kernels_off_reason() -> Optional[str]:
    kernels_ready()
    return _state["why"]


def set_fused_ops(enabled: bool) -> None:
    """Layers use the fused element-wise ops where loaded (True, the default) or torch's ops."""
    global _FUSED
    _FUSED = bool(enabled)


def fused_ops_on(x: torch.Tensor) -> bool:
    """Whether the layers run the fused ops on activations like x (bf16 on CPU, kernels loaded)."""
    return _FUSED and x.dtype == torch.bfloat16 and x.device.type == "cpu" and kernels_ready()


def mode() -> tuple:
    """What the kernels do now (fused ops on): a traced step records one mode."""
    return (_FUSED,)


def gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bf16(x @ weight.T + bias) for one row x [..., K] (numel K) and a contiguous bf16 weight [N, K]."""
    return torch.ops.powersample_fast.gemv_bf16(x, weight, bias)


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * bf16(x * rsqrt(mean(x^2) + eps)), in fp32 over x's last dim (bf16 x and weight)."""
    return torch.ops.powersample_fast.rms_norm_bf16(x, weight, eps)


def silu_mul_bf16(gu: torch.Tensor) -> torch.Tensor:
    """bf16(bf16(silu(g)) * u) for gu = [g; u] along the last dim."""
    return torch.ops.powersample_fast.silu_mul_bf16(gu)


def attn_decode_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA(q, k, v, attn_mask=mask) for q [B, Hk, M, D], k/v [B, Hk, L, D], an additive mask [B, 1, M, L]
    (D a multiple of 16, <= 256; unit last strides), fp32 inside, one bf16 rounding."""
    return torch.ops.powersample_fast.attn_decode_bf16(q, k, v, mask)


def rope_bf16(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, n_heads: int, head_dim: int,
              rotary_dim: int) -> torch.Tensor:
    """`apply_rope` of the first n_heads heads of qkv [B, T, W] -> [B, n_heads, T, head_dim], bit for bit."""
    return torch.ops.powersample_fast.rope_bf16(qkv, cos, sin_signed, n_heads, head_dim, rotary_dim)
