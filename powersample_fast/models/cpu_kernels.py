"""The CPU kernels of csrc/ (built once per machine, loaded on demand): a bf16 one-row gemv for the
steps of one-row engines (cpu_linear.one_row_engine) and the fused element-wise ops of a decoder
layer, in bf16 (gemv_bf16.cpp, fused_bf16.cpp: CPUs with AVX512-BF16) and fp32 (fused_f32.cpp:
AVX2 + FMA).

(One-row fp32 engines need no kernel of ours: their linears run torch's F.linear, MKL's sgemv.)

A 1-row decode step of a small model is weight reads through matrix-vector products plus ~1500 tiny
element-wise ops. torch's gemv and oneDNN's packed kernels read bf16 weights at ~14-16 GB/s on this
project's 2-core machines, the AVX512-BF16 gemv at ~20-25 GB/s; the fused ops replace RMSNorm (8
ops), RoPE (~10) and SiLU-and-multiply (~4) by one op each, and SDPA of a decode step (a few query
rows per kv head, where its CPU kernels spend ~60 us a call on set-up) by a direct loop. Numbers:
benchmarks/results/cpu-decode.md. They are torch ops (torch.ops.powersample_fast.*, schemas in
csrc/ops.cpp), so a traced CPU step records them like aten ops.

Built with the system C++ compiler ($CXX, else g++) against the installed torch's headers, each
source with its own instruction-set flags, only the parts this CPU can run, the first time a process
needs them (~15-25 s, one stderr line says so; `prepare_in_background` overlaps it with the model's
loading), into `<cache_home>/ext/<hash of sources, torch version, flags>/` and loaded from there
afterwards; two processes building at once each write their own file and rename it into place.
Anything that fails (no compiler, a compile error, a load error) leaves them off for the process
with one stderr line: linears and layers keep torch's ops. POWERSAMPLE_FAST_CPU_KERNELS=0 turns
them off.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

KERNEL_ENV = "POWERSAMPLE_FAST_CPU_KERNELS"
CSRC = Path(__file__).resolve().parent / "csrc"
BASE_FLAGS = ["-O3", "-std=c++20", "-fPIC", "-w"]
# source -> its own flags; a part is built where the CPU has what its flags ask for
PARTS = {
    "ops.cpp": [],  # the ops' schemas
    "gemv_bf16.cpp": ["-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
    "fused_bf16.cpp": ["-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
    "fused_f32.cpp": ["-fopenmp", "-mavx2", "-mfma", "-ffp-contract=off"],
}

_state: dict = {}  # "loaded": bool, "why": reason they are off, "dtypes": what they run (once decided)
_lock = threading.Lock()  # one decision (and build) per process, also with `prepare_in_background`
_FUSED = True  # layers use the fused ops where loaded (set_fused_ops)


def _capabilities() -> dict:
    caps = getattr(torch.cpu, "get_capabilities", None)
    try:
        return caps() if caps is not None else {}
    except Exception:  # noqa: BLE001 - an old torch: no kernels
        return {}


def cpu_dtypes() -> tuple:
    """The dtypes this CPU can run kernels for: bf16 with AVX512-BF16, fp32 with AVX2 + FMA."""
    caps = _capabilities()
    return ((torch.bfloat16,) if caps.get("avx512_bf16") else ()) + \
        ((torch.float32,) if caps.get("avx2") and caps.get("fma3") else ())


def _sources(dtypes) -> list:
    names = ["ops.cpp"] + (["gemv_bf16.cpp", "fused_bf16.cpp"] if torch.bfloat16 in dtypes else []) + \
        (["fused_f32.cpp"] if torch.float32 in dtypes else [])
    return [CSRC / n for n in names]


def _library_path(cxx: str, sources) -> Path:
    from .default_model import cache_home

    key = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sources) + torch.__version__.encode()
                         + " ".join([cxx] + BASE_FLAGS + [f for p in sources for f in PARTS[p.name]]).encode())
    return cache_home() / "ext" / key.hexdigest()[:16] / "powersample_cpu.so"


def _build(cxx: str, sources, target: Path) -> None:
    torch_dir = Path(torch.__file__).resolve().parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=target.parent))  # our own, whoever else builds
    print(f"powersample-fast: building the CPU kernels once (~15 s; cached in {target.parent})",
          file=sys.stderr, flush=True)
    try:
        objs = []
        for src in sources:  # each part with its own instruction-set flags
            obj = tmp / (src.stem + ".o")
            _run([cxx, *BASE_FLAGS, *PARTS[src.name], f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{torch_dir / 'include'}",
                  "-c", str(src), "-o", str(obj)], cxx)
            objs.append(str(obj))
        lib = tmp / "lib.so"
        _run([cxx, "-shared", "-fopenmp", "-o", str(lib), *objs, f"-L{torch_dir / 'lib'}", "-lc10", "-ltorch_cpu",
              f"-Wl,-rpath,{torch_dir / 'lib'}"], cxx)
        os.replace(lib, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cmd, cxx: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{cxx} failed ({last})")


def _load() -> tuple:
    """Load (building it first where needed) the kernel library: (None, dtypes) or (why it stays off, ())."""
    if os.environ.get(KERNEL_ENV, "1") == "0":
        return f"{KERNEL_ENV}=0", ()
    dtypes = cpu_dtypes()
    if not dtypes:
        return "this CPU has neither AVX512-BF16 nor AVX2 with FMA", ()
    if hasattr(torch.ops.powersample_fast, "rms_norm_f32"):
        return None, dtypes  # loaded by another path (another copy of this module)
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx}) to build them", ()
    try:
        sources = _sources(dtypes)
        target = _library_path(cxx, sources)
        if not target.is_file():
            _build(cxx, sources, target)
        try:
            torch.ops.load_library(str(target))
        except OSError:  # a cached file that does not load (cut short, damaged): built again, once
            target.unlink(missing_ok=True)
            _build(cxx, sources, target)
            torch.ops.load_library(str(target))
        torch.ops.powersample_fast.rms_norm_f32  # noqa: B018 - raises if the library registered nothing
    except Exception as e:  # noqa: BLE001 - any failure: torch's ops instead
        return f"{type(e).__name__}: {e}", ()
    return None, dtypes


def kernels_ready() -> bool:
    """Whether the kernels are loaded (decided, and built, on first call)."""
    if "loaded" not in _state:
        with _lock:
            if "loaded" not in _state:
                why, dtypes = _load()
                if why is not None and os.environ.get(KERNEL_ENV, "1") != "0" and cpu_dtypes():
                    print(f"powersample-fast: CPU kernels off ({why}); using torch's ops",
                          file=sys.stderr, flush=True)
                _state.update(loaded=why is None, why=why, dtypes=dtypes)
    return _state["loaded"]


def has_dtype(dtype) -> bool:
    """Whether the loaded kernels run `dtype` (bf16: AVX512-BF16 CPUs; fp32: AVX2 + FMA)."""
    return kernels_ready() and dtype in _state["dtypes"]


def prepare_in_background(device, dtype) -> None:
    """Start deciding (and, the first time on a machine, building) the kernels on a thread, so a
    build overlaps the model's loading; `kernels_ready` waits for it. Only for CPU runs."""
    if ("loaded" in _state or "started" in _state or torch.device(device).type != "cpu"
            or dtype not in (torch.bfloat16, torch.float32)):
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
    """Whether the layers run the fused ops on activations like x (on CPU, kernels loaded for its dtype)."""
    return _FUSED and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and has_dtype(x.dtype)


def mode() -> tuple:
    """What the kernels do now (fused ops on): a traced step records one mode."""
    return (_FUSED,)


def _op(name: str, dtype):
    return getattr(torch.ops.powersample_fast, f"{name}_{'bf16' if dtype == torch.bfloat16 else 'f32'}")


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bf16(x @ weight.T + bias) for one bf16 row x [..., K] (numel K) and a contiguous bf16 weight
    [N, K]: one rounding of the fp32 sum."""
    return torch.ops.powersample_fast.gemv_bf16(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) over x's last dim, in fp32 (bf16: rounded where torch rounds)."""
    return _op("rms_norm", x.dtype)(x, weight, eps)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for gu = [g; u] along the last dim (bf16: bf16(bf16(silu(g)) * u))."""
    return _op("silu_mul", gu.dtype)(gu)


def attn_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA(q, k, v, attn_mask=mask) for q [B, Hk, M, D], k/v [B, Hk, L, D], an additive mask [B, 1, M, L]
    (D a multiple of 16, <= 256; unit last strides), fp32 inside (bf16: one rounding)."""
    return _op("attn_decode", q.dtype)(q, k, v, mask)


def rope(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, n_heads: int, head_dim: int,
         rotary_dim: int) -> torch.Tensor:
    """`apply_rope` of the first n_heads heads of qkv [B, T, W] -> [B, n_heads, T, head_dim], bit for bit."""
    return _op("rope", qkv.dtype)(qkv, cos, sin_signed, n_heads, head_dim, rotary_dim)
