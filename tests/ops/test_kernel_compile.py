"""The Triton kernels compile ahead of time for sm_90 (H100 / H200) under the installed Triton.

No GPU needed: benchmarks/compile_sm90.py plans the launches on meta tensors and compiles, for each
kernel, the specialisation that covers the most code (bf16, top-k, sampling, split-V, libdevice
log) down to a cubin with the ptxas bundled in the Triton wheel. CI installs an unpinned Triton,
so this catches Triton API drift (and a kernel with no compile scenario) before a GPU run does.
The full matrix: ``python benchmarks/compile_sm90.py`` (benchmarks/results/compile-sm90.md).

It runs in a subprocess because the compile needs TRITON_INTERPRET=0 when csrc_triton is
imported, and conftest.py sets TRITON_INTERPRET=1 for this process on a machine without CUDA.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "compile_sm90.py"
NO_CUDA_COMPILER = 2  # compile_sm90.py's exit status when this Triton cannot compile for CUDA


@pytest.mark.slow  # a subprocess compiling every kernel: ~3-6 s
def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                                     os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, str(SCRIPT), "--one-per-kernel"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    if res.returncode == NO_CUDA_COMPILER:
        pytest.skip(out.strip().splitlines()[-1])
    assert res.returncode == 0, out[-6000:]
    for kernel in ("_sample_kernel", "_sample_combine_kernel", "_kv_copy_kernel",
                   "_mh_accept_kernel", "_topn_kernel"):
        assert f"] {kernel} " in res.stdout, (kernel, res.stdout[-3000:])
