#!/usr/bin/env python
"""Compile every csrc_triton kernel ahead of time for sm_90 (H100 / H200), without a GPU.

What gets compiled is taken from the launchers themselves: each launcher (sample_logprobs,
gather_logprobs, topn_logprobs, kv_copy_, mh_accept_) is called on *meta* tensors shaped like a real run (the
sampler's views and strides included), with every ``@triton.jit`` kernel it launches swapped for a
recorder. ``csrc_triton.sample._is_cuda`` is patched to say "cuda" for meta tensors and
``_num_sms`` to return the GPU's SM count (132 on H100 SXM / H200), so the launchers pick the
split-V plan, BLOCK sizes, num_warps and libdevice log they would pick on the GPU. Each recorded
launch is then specialised the way Triton's JIT specialises it (``native_specialize_impl``:
pointer alignment, ints equal to 1 or divisible by 16, i32 / i64), deduplicated, and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` down to a cubin with the
ptxas bundled in the Triton wheel. Registers and spills come from ptxas' own -v log (a compiled
kernel's ``n_regs`` / ``n_spills`` need a GPU driver), shared memory from ``metadata.shared``.

A kernel in csrc_triton that no scenario launches is an error, so a new kernel cannot be skipped
silently.

    python benchmarks/compile_sm90.py                       # everything, table on stdout
    python benchmarks/compile_sm90.py --markdown out.md     # also a markdown table
    python benchmarks/compile_sm90.py --filter 'kv_copy.*bf16'
    python benchmarks/compile_sm90.py --one-per-kernel     # quick: tests/test_kernel_compile.py
    python benchmarks/compile_sm90.py --merge a.json b.json  # one table of two runs' --json

Exit status: 0 all compiled, 1 a compile failed / a kernel went uncovered, 2 this Triton cannot
compile for CUDA here (no nvidia backend, no ptxas, or Triton < 3.3 whose ASTSource takes
int-keyed signatures and ``constants=``; 3.3 to 3.9 take names and ``constexprs=``).
"""
from __future__ import annotations

import os
import sys

# Compile, never interpret: triton.jit reads this when csrc_triton's kernels are decorated.
os.environ["TRITON_INTERPRET"] = "0"
# ptxas' -v log (registers, spills) is printed by Triton's CUDA backend when this is set.
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import pkgutil  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SM = 90
H100_SMS = 132  # H100 SXM and H200 (H100 PCIe: 114)


# ---------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------
def cuda_backend_problem():
    """None if this Triton can compile for CUDA here, else why not."""
    try:
        import triton
        from triton.backends import backends
    except Exception as e:  # pragma: no cover
        return f"triton not importable ({type(e).__name__}: {e})"
    if "nvidia" not in backends:
        return f"triton {triton.__version__} has no nvidia backend (backends: {sorted(backends)})"
    if not ptxas_path():
        return f"triton {triton.__version__} ships no ptxas and none is on PATH / TRITON_PTXAS_PATH"
    if "constexprs" not in inspect.signature(triton.compiler.ASTSource.__init__).parameters:
        return (f"triton {triton.__version__}: ASTSource has no constexprs= (Triton < 3.3, "
                "int-keyed signatures and constants=); this script speaks the >= 3.3 API")
    return None


def ptxas_path():
    try:
        from triton import knobs

        p = knobs.nvidia.ptxas.path
        if p and os.path.exists(p):
            return p
    except Exception:
        pass
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(p) if p.exists() else None


def versions():
    import numpy
    import torch
    import triton

    v = {"python": platform.python_version(), "torch": torch.__version__,
         "triton": triton.__version__, "numpy": numpy.__version__}
    p = ptxas_path()
    if p:
        out = subprocess.run([p, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release (\S+), (V\S+)", out)
        v["ptxas"] = f"{m.group(1).rstrip(',')} {m.group(2)}" if m else out.strip().splitlines()[-1]
    return v


# ---------------------------------------------------------------------------------------------
# kernels and their launches
# ---------------------------------------------------------------------------------------------
def discover():
    """{name: (module, JITFunction)} of the kernels csrc_triton launches (``name[grid](...)`` in
    its module's source), and the names of the @triton.jit device helpers they inline."""
    import csrc_triton
    from triton.runtime.jit import JITFunction

    kernels, helpers = {}, []
    for info in pkgutil.iter_modules(csrc_triton.__path__):
        mod = importlib.import_module(f"csrc_triton.{info.name}")
        src = inspect.getsource(mod)
        for name, obj in vars(mod).items():
            if not isinstance(obj, JITFunction) or obj.fn.__module__ != mod.__name__:
                continue
            if re.search(rf"\b{re.escape(name)}\[", src):
                kernels[name] = (mod, obj)
            else:
                helpers.append(name)
    return kernels, helpers


@dataclass
class Launch:
    kernel: str
    args: tuple
    kwargs: dict
    scenario: dict


@contextlib.contextmanager
def recording(kernels, sms):
    """Swap every kernel for a recorder and make meta tensors look like a CUDA device with
    ``sms`` SMs to the launch planning. Yields the list the launches are appended to."""
    from csrc_triton import sample

    launches, scenario = [], {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(Launch(self.name, args, kwargs, dict(scenario)))
            return launch

    saved = [(mod, name, jf) for name, (mod, jf) in kernels.items()]
    saved_sample = (sample._is_cuda, sample._num_sms)
    try:
        for mod, name, _ in saved:
            setattr(mod, name, Recorder(name))
        sample._is_cuda = lambda d: d.type in ("cuda", "meta")
        sample._num_sms = lambda d: sms
        yield launches, scenario
    finally:
        for mod, name, jf in saved:
            setattr(mod, name, jf)
        sample._is_cuda, sample._num_sms = saved_sample


# The default model (SmolLM2-135M-Instruct) and a 1-KV-head shape (MQA: n_kv_heads = 1 is specialised
# to a constant by Triton); the GPU benchmark's models come from run_benchmarks.SHAPES.
EXTRA_SHAPES = {"smollm2-135m (default)": (49152, 30, 3, 64),
                "mqa-1kv-d256 (shape only)": (256000, 18, 1, 256)}


def model_shapes():
    """{name: (vocab, n_layers, n_kv_heads, head_dim)}: the default model, the models
    benchmarks/run_benchmarks.py times on the GPU, and an MQA shape."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run_benchmarks

    from powersample_fast.models.config import ModelConfig

    shapes = dict(EXTRA_SHAPES)
    for name, hf in run_benchmarks.SHAPES.items():
        c = ModelConfig.from_hf(hf)
        shapes[name] = (c.vocab_size, c.n_layers, c.n_kv_heads, c.head_dim)
    return shapes


def run_scenarios(scenario, shapes):
    """Call the launchers on meta tensors shaped as the sampler calls them on the GPU."""
    import torch

    import csrc_triton

    meta = torch.device("meta")
    f32, i64 = torch.float32, torch.int64
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    # sample_logprobs / gather_logprobs: decode logits are forward(...)[:, 0] of [B, 1, V]; keys
    # are row 1 of the [5, B] int64 step input (sampler.decode_step); threshold [B] fp32 (top-k).
    for V in sorted({v for v, _, _, _ in shapes.values()}):
        for R in (1, 8, 64, 512):
            for dt in dtypes:
                for topk in (False, True):
                    logits = torch.empty(R, 1, V, dtype=dt, device=meta)[:, 0]
                    inp = torch.empty(5, R, dtype=i64, device=meta)
                    thr = torch.empty(R, dtype=f32, device=meta) if topk else None
                    scenario.clear()
                    scenario.update(launcher="sample_logprobs", R=R, V=V)
                    csrc_triton.sample_logprobs(logits, inp[1], 4.0, thr)
                    scenario.update(launcher="sample_logprobs+entropy")  # index="entropy" rows
                    csrc_triton.sample_logprobs(logits, inp[1], 4.0, thr, entropy=True)
                    scenario.update(launcher="gather_logprobs")
                    csrc_triton.gather_logprobs(logits, torch.empty(R, dtype=i64, device=meta),
                                                4.0, thr)

    # topn_logprobs: a decode step's logits (forward(...)[:, 0] of [B, 1, V]) or a scored prompt's
    # prefill chunk ([C, V], contiguous), the asking rows and their tokens (int64), N <= 20.
    for V in sorted({v for v, _, _, _ in shapes.values()}):
        for dt in dtypes:
            for n in (0, 1, 5, 20):
                for logits in (torch.empty(64, 1, V, dtype=dt, device=meta)[:, 0],
                               torch.empty(256, V, dtype=dt, device=meta)):
                    rows = torch.empty(8, dtype=i64, device=meta)
                    scenario.clear()
                    scenario.update(launcher="topn_logprobs", V=V, n=n)
                    csrc_triton.topn_logprobs(logits, rows, rows, n)

    # kv_copy_: KVCache.kv [L, 2, N, H, S, D] (contiguous), index vectors built by torch.tensor.
    for model, (_, L, H, D) in shapes.items():
        for N in (16, 128):
            for S in (256, 4096):
                for dt in dtypes:
                    kv = torch.empty(L, 2, N, H, S, D, dtype=dt, device=meta)
                    idx = torch.empty(N // 2, dtype=i64, device=meta)
                    scenario.clear()
                    scenario.update(launcher="kv_copy_", model=model, N=N, S=S)
                    csrc_triton.kv_copy_(kv, idx, idx, idx, idx)

    # mh_accept_: cur = buffer[0], prop = buffer[1] of the sampler's [2, S, T] tok / lp / lq.
    for S in (8, 64):
        for T in (192, 1024, 4096):
            tok = torch.empty(2, S, T, dtype=i64, device=meta)
            lp = torch.empty(2, S, T, dtype=f32, device=meta)
            lq = torch.empty(2, S, T, dtype=f32, device=meta)
            ln = torch.empty(S, dtype=i64, device=meta)
            n = S // 2
            rows = torch.empty(n, dtype=i64, device=meta)
            scenario.clear()
            scenario.update(launcher="mh_accept_", S=S, T=T)
            csrc_triton.mh_accept_(tok[0], lp[0], lq[0], ln, tok[1], lp[1], lq[1], ln,
                                   rows, rows, rows, torch.empty(n, dtype=f32, device=meta), 4.0)
            # index="entropy": the index term given, the h buffers committed
            h = torch.empty(2, S, T, dtype=f32, device=meta)
            scenario.update(launcher="mh_accept_+entropy")
            csrc_triton.mh_accept_(tok[0], lp[0], lq[0], ln, tok[1], lp[1], lq[1], ln,
                                   rows, rows, rows, torch.empty(n, dtype=f32, device=meta), 4.0,
                                   index_term=torch.empty(n, dtype=f32, device=meta), cur_h=h[0], prop_h=h[1])


# ---------------------------------------------------------------------------------------------
# specialisation (as triton.runtime.jit does it) and compilation
# ---------------------------------------------------------------------------------------------
def _specialize_fallback(value, specialize, align):
    """Triton >= 3.3's rules, for a Triton without ``native_specialize_impl``."""
    import torch

    if isinstance(value, torch.Tensor):
        name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                torch.int64: "i64", torch.int32: "i32", torch.bool: "u1"}[value.dtype]
        return "*" + name, ("D" if align and value.data_ptr() % 16 == 0 else "")
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if specialize and value == 1:
            return "constexpr", 1
        ty = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return ty, ("D" if specialize and align and value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"no specialisation rule for {type(value).__name__}")


@dataclass
class Variant:
    kernel: str
    jf: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    scenarios: list = field(default_factory=list)
    status: str = ""
    error: str = ""
    regs: object = None
    spill_st: object = None
    spill_ld: object = None
    stack: object = None
    shared: object = None
    cubin_bytes: int = 0
    seconds: float = 0.0

    def key(self):
        return (self.kernel, tuple(self.signature.items()),
                tuple((k, repr(v)) for k, v in self.constexprs.items()),
                tuple((k, repr(v)) for k, v in sorted(self.attrs.items())),
                tuple(sorted(self.options.items())))

    def dtype(self):
        for name, ty in self.signature.items():
            if ty.startswith("*"):
                return ty[1:]  # the first pointer: logits / kv cache / cur_tok
        return "-"

    def spec(self):
        """Kernel constexprs, num_warps, and the int arguments specialised to 1 / %16."""
        params = {p.name: p for p in self.jf.params}
        cx = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs.items()
              if params[k].is_constexpr]
        ones = [k for k, v in self.constexprs.items() if not params[k].is_constexpr]
        names = list(self.signature)
        div = [names[i[0]] for i, a in self.attrs.items()
               if a and not self.signature[names[i[0]]].startswith("*")]
        unaligned = [names[i[0]] for i, a in self.attrs.items()
                     if not a and self.signature[names[i[0]]].startswith("*")]
        s = " ".join(cx) + f" w{self.options.get('num_warps', 4)}"
        if ones:
            s += f"; =1: {','.join(ones)}"
        if div:
            s += f"; %16: {','.join(div)}"
        if unaligned:
            s += f"; unaligned: {','.join(unaligned)}"
        return s

    def used_by(self):
        keys = {}
        for sc in self.scenarios:
            for k, v in sc.items():
                keys.setdefault(k, [])
                if v not in keys[k]:
                    keys[k].append(v)
        return " ".join(f"{k}={'/'.join(map(str, v))}" for k, v in keys.items())


def specialise(launches, kernels, backend):
    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:
        native_specialize_impl = None
    variants = {}
    for ln in launches:
        jf = kernels[ln.kernel][1]
        sig = inspect.signature(jf.fn)
        kw = {k: v for k, v in ln.kwargs.items() if k in sig.parameters}
        options = {k: v for k, v in ln.kwargs.items() if k not in sig.parameters}
        bound = sig.bind(*ln.args, **kw)
        bound.apply_defaults()
        signature, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(jf.params):
            value = bound.arguments[p.name]
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", value
                continue
            spec = not p.do_not_specialize
            align = not p.do_not_specialize_on_alignment
            if native_specialize_impl is not None:
                ty, attr = native_specialize_impl(backend, value, p.is_const, spec, align)[:2]
            else:
                ty, attr = _specialize_fallback(value, spec, align)
            signature[p.name] = ty
            if ty == "constexpr":
                constexprs[p.name] = attr
            elif isinstance(attr, str):
                attrs[(i,)] = backend.parse_attr(attr)
        v = Variant(ln.kernel, jf, signature, constexprs, attrs, options)
        v = variants.setdefault(v.key(), v)
        v.scenarios.append(ln.scenario)
    return list(variants.values())


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _summary(e):
    """One line of a compile error: its position, the source line under Triton's caret, the
    message (a CompilationError's text is the kernel source with the message last)."""
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    carets = [i for i, ln in enumerate(lines) if i and set(ln.strip()) == {"^"}]
    parts = lines[:1]
    if carets:
        parts.append(lines[carets[-1] - 1].strip())
    if len(lines) > 1:
        parts.append(lines[-1].strip())
    return f"{type(e).__name__}: " + " / ".join(parts)[:400]


def compile_variant(v, target):
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(fn=v.jf, signature=v.signature, constexprs=v.constexprs, attrs=v.attrs)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            ck = triton.compile(src, target=target, options=dict(v.options))
        cubin = ck.asm.get("cubin", b"")
        if not cubin:
            raise RuntimeError(f"no cubin produced (asm keys: {sorted(ck.asm)})")
        v.cubin_bytes = len(cubin)
        v.shared = getattr(ck.metadata, "shared", None)
        text = log.getvalue()
        m = _RE_REGS.search(text)
        v.regs = int(m.group(1)) if m else None
        m = _RE_SPILL.search(text)
        if m:
            v.stack, v.spill_st, v.spill_ld = (int(g) for g in m.groups())
        v.status = "ok"
    except Exception as e:  # noqa: BLE001 - every failure is reported in the table
        v.status = "ERROR"
        v.error = _summary(e)
        print(f"{v.kernel} {v.dtype()} {v.spec()}:\n{type(e).__name__}: {e}\n{log.getvalue()}",
              file=sys.stderr)
    v.seconds = time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
COLUMNS = ("kernel", "dtype", "specialisation", "status", "regs", "spill st/ld B", "stack B",
           "smem B", "cubin B", "s", "launched by")


def row(v):
    spill = "-" if v.spill_st is None else f"{v.spill_st}/{v.spill_ld}"
    na = lambda x: "-" if x is None else str(x)  # noqa: E731
    return (v.kernel, v.dtype(), v.spec(), v.status if v.status == "ok" else f"{v.status}: {v.error}",
            na(v.regs), spill, na(v.stack), na(v.shared), str(v.cubin_bytes or "-"),
            f"{v.seconds:.1f}", v.used_by())


def _coverage(v):
    """How much of its kernel a variant compiles: bf16 (the GPU default) first, then the most
    boolean constexprs switched on (SAMPLE, HAS_TOPK, SPLIT, PRECISE_LOG), then the largest
    unrolled count N (topn's top-N rounds), then the most used."""
    flags = sum(1 for x in v.constexprs.values() if x is True)
    return (v.dtype() == "bf16", flags, v.constexprs.get("N", 0), len(v.scenarios))


def merge(paths):
    """One markdown table of several --json results (e.g. two Triton versions), row per
    specialisation: status, regs, spills, smem for each."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    key = lambda r: (r["kernel"], r["dtype"], r["specialisation"], r["launched by"])  # noqa: E731
    order, tables = [], []
    for run in runs:
        t = {}
        for r in run["variants"]:
            t[key(r)] = r
            if key(r) not in order:
                order.append(key(r))
        tables.append(t)
    names = [f"triton {run['versions']['triton']}" for run in runs]
    head = ["kernel", "dtype", "specialisation", "launched by"]
    for n in names:
        head += [f"{n}: status", "regs", "spill st/ld B", "smem B"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in order:
        cells = list(k)
        for t in tables:
            r = t.get(k)
            cells += ([r["status"], r["regs"], r["spill st/ld B"], r["smem B"]] if r
                      else ["not compiled", "", "", ""])
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def markdown_table(variants):
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for v in variants:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in row(v)) + " |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sms", type=int, default=H100_SMS, help="SM count the launch plan assumes")
    ap.add_argument("--filter", default="", help="regex on 'kernel dtype specialisation launched-by'")
    ap.add_argument("--limit", type=int, default=0, help="compile at most this many variants")
    ap.add_argument("--markdown", help="write the table as markdown to this file")
    ap.add_argument("--json", help="write the results as JSON to this file")
    ap.add_argument("--one-per-kernel", action="store_true",
                    help="compile one variant per kernel: the one that compiles the most code")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="print one markdown table of earlier --json results and exit")
    args = ap.parse_args(argv)
    if args.merge:
        print(merge(args.merge))
        return 0

    problem = cuda_backend_problem()
    if problem:
        print(f"cannot compile for CUDA: {problem}")
        return 2

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    try:
        from triton import knobs

        knobs.nvidia.dump_ptxas_log = True
    except Exception:
        pass
    # a fresh cache, so that every variant really goes through ptxas (and its log is seen)
    cache = tempfile.TemporaryDirectory(prefix="triton-sm90-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    try:
        knobs.cache.dir = cache.name
    except Exception:
        pass

    ver = versions()
    print("versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()))
    target = GPUTarget("cuda", SM, 32)
    backend = make_backend(target)

    kernels, helpers = discover()
    print(f"kernels: {', '.join(kernels)}; inlined @triton.jit helpers: {', '.join(helpers)}")
    shapes = model_shapes()
    print("shapes (vocab, layers, kv heads, head_dim): "
          + "; ".join(f"{k} {v}" for k, v in shapes.items()))
    with recording(kernels, args.sms) as (launches, scenario):
        run_scenarios(scenario, shapes)
    variants = specialise(launches, kernels, backend)
    missing = sorted(set(kernels) - {v.kernel for v in variants})
    print(f"{len(launches)} launches recorded -> {len(variants)} distinct specialisations")

    if args.one_per_kernel:
        variants = [max((v for v in variants if v.kernel == k), key=_coverage) for k in kernels
                    if any(v.kernel == k for v in variants)]
    if args.filter:
        rx = re.compile(args.filter)
        variants = [v for v in variants if rx.search(f"{v.kernel} {v.dtype()} {v.spec()} {v.used_by()}")]
    if args.limit:
        variants = variants[:args.limit]
    t0 = time.perf_counter()
    for i, v in enumerate(variants):
        compile_variant(v, target)
        status = f"{v.status} {v.error}" if v.error else v.status
        print(f"[{i + 1}/{len(variants)}] {v.kernel} {v.dtype()} {v.spec()}: {status} "
              f"({v.seconds:.1f} s, regs {v.regs}, spills {v.spill_st}/{v.spill_ld}, "
              f"smem {v.shared})", flush=True)
    total = time.perf_counter() - t0

    table = markdown_table(variants)
    print()
    print(table)
    n_ok = sum(v.status == "ok" for v in variants)
    print(f"\n{n_ok}/{len(variants)} compiled for sm_{SM} in {total:.0f} s "
          f"(triton {ver['triton']}, torch {ver['torch']})")
    if missing and not args.filter:
        print(f"ERROR: kernels launched by no scenario: {', '.join(missing)}")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "versions": ver, "target": f"cuda sm_{SM}", "sms": args.sms, "seconds": total,
            "uncovered_kernels": missing,
            "variants": [dict(zip(COLUMNS, row(v))) for v in variants]}, indent=1) + "\n")
    cache.cleanup()
    return 0 if n_ok == len(variants) and (not missing or args.filter) else 1


if __name__ == "__main__":
    sys.exit(main())
