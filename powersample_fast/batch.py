"""`powersample-fast run`: power-sample a JSONL file of problems on one engine, resumably.

Input lines: `{"id": ..., "prompt": "..." | [token ids], or "messages": [...], optional parameters
(any SamplingParams field: method, alpha, mcmc_steps, n, seed, ...), optional "answer"}`. All lines
share one running decode batch; each line's record is appended as soon as its request finishes, so a
crash loses only the requests in flight and `--resume` skips what is already written. At the end the
output is rewritten in input order and a summary is printed. Under torchrun the lines are sharded
over ranks (see `distributed.py`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

from . import distributed
from .cli_setup import add_engine_args, apply_threads, check_engine_args, note_slow_dtype
from .errors import ConfigError, PowerSampleError
from .grading import GRADERS, check_grader, grade_math, pass_at_k
from .results_store import ResultStore

_CLI_TO_FIELD = {"method": "method", "alpha": "alpha", "steps": "mcmc_steps", "block_size": "block_size",
                 "max_new_tokens": "max_new_tokens", "temperature": "proposal_temperature", "n": "n",
                 "seed": "seed", "top_k": "top_k", "index": "index"}


@dataclass
class Job:
    line: int
    id: Any
    ids: list
    params: Any
    answer: Any = None

    @property
    def prompt_index(self) -> int:
        """Keys the chains' seeds to the line's id, not its position or rank."""
        return int.from_bytes(hashlib.blake2b(str(self.id).encode(), digest_size=4).digest(), "little")


def parse_line(line: int, raw: str, defaults: dict, tokenizer, chat: Optional[bool], param_cls):
    """A Job, or an error record (dict) for a line that cannot run."""
    obj = None
    try:
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise ConfigError(f"not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"a line must be a JSON object (got {type(obj).__name__})")
        if not isinstance(obj.get("id"), (str, int)) or isinstance(obj.get("id"), bool):
            raise ConfigError("a line needs an \"id\" (a string or an integer)")
        if ("prompt" in obj) == ("messages" in obj):
            raise ConfigError("a line needs exactly one of \"prompt\" and \"messages\"")
        names = {f.name for f in dataclasses.fields(param_cls)}
        params = param_cls(**{**defaults, **{k: v for k, v in obj.items() if k in names}})
        if "messages" in obj:
            from .openai_protocol import _encode_prompts

            ids = _encode_prompts(obj, True, tokenizer)[0]
        else:
            from .params import normalize_prompts

            p = obj["prompt"]
            ids = normalize_prompts(p if isinstance(p, str) else [p], tokenizer, chat=chat)[0]  # ids: never templated
        return Job(line, obj["id"], ids, params, obj.get("answer"))
    except ValueError as e:  # ConfigError, json.JSONDecodeError
        rec = {"line": line, "error": f"line {line}: {e}"}
        if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)):
            rec = {"line": line, "id": obj["id"], "error": rec["error"]}
        return rec


def record(job: Job, results, grade: Optional[str]) -> dict:
    samples = []
    for r in results:
        s = r.to_dict()
        s.pop("prompt_index", None)
        if grade and job.answer is not None:
            s["extracted"], s["correct"] = grade_math(r.text, job.answer)
        samples.append(s)
    rec = {"line": job.line, "id": job.id, "params": dataclasses.asdict(job.params), "prompt_tokens": len(job.ids)}
    if job.answer is not None:
        rec["answer"] = job.answer
    if grade and job.answer is not None:
        rec["num_correct"] = sum(bool(s["correct"]) for s in samples)
    rec["samples"] = samples
    return rec


def summarize(recs, tokens_run: int, wall_s: float) -> dict:
    ok = [r for r in recs if "error" not in r]
    graded = [r for r in ok if "num_correct" in r]
    out = {"lines": len(recs), "ok": len(ok), "errors": len(recs) - len(ok), "graded": len(graded),
           "tokens_sampled": sum(s["stats"].get("tokens_sampled", 0) for r in ok for s in r["samples"]),
           "tokens_sampled_this_run": tokens_run, "wall_s": wall_s,
           "tokens_per_s": tokens_run / wall_s if wall_s > 0 else float("nan")}
    if graded:
        out["accuracy"] = sum(r["num_correct"] / len(r["samples"]) for r in graded) / len(graded)
        n_min, k = min(len(r["samples"]) for r in graded), 2
        while k <= n_min:
            out[f"pass@{k}"] = sum(pass_at_k(len(r["samples"]), r["num_correct"], k) for r in graded) / len(graded)
            k *= 2
    return out


def add_parser(subparsers):
    r = subparsers.add_parser("run", help="power-sample a JSONL file of problems (resumable; shard with torchrun)")
    add_engine_args(r, model_help="HF-format model directory, or 'default'",
                    device_help="torch device (default: cuda:LOCAL_RANK if CUDA, else cpu)")
    r.add_argument("--input", required=True, help="JSONL: one {\"id\", \"prompt\" | \"messages\", ...} per line")
    r.add_argument("--output", required=True, help="JSONL of results (appended as requests finish)")
    r.add_argument("--resume", action="store_true", help="skip ids already in the output and continue it")
    r.add_argument("--grade", choices=GRADERS, default=None, help="grade each sample against the line's \"answer\"")
    chat = r.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap string prompts in the model's chat template (default: when the tokenizer has one, "
                           "as `sample` does; \"messages\" lines always are, token-id prompts never)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="give string prompts to the model as they are")
    r.add_argument("--method", default=None, help="sampling method (default: mh)")
    r.add_argument("--alpha", type=float, default=None, help="power alpha (default 4)")
    r.add_argument("--steps", type=int, default=None, help="MH steps per block (default 10)")
    r.add_argument("--block-size", type=int, default=None, help="block size B (default 192)")
    r.add_argument("--max-new-tokens", type=int, default=None, help="token budget T (default 3072)")
    r.add_argument("--temperature", type=float, default=None, help="proposal temperature (default 1/alpha)")
    r.add_argument("--n", type=int, default=None, help="samples per line (default 1)")
    r.add_argument("--seed", type=int, default=0, help="base seed (default 0); chains are keyed by (seed, id, sample)")
    r.add_argument("--top-k", type=int, default=None, help="restrict proposals to the top-k tokens")
    r.add_argument("--index", default=None, choices=["uniform", "last_block"], help="cut-index mode")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(func=main)
    return r


def main(args) -> int:
    info = distributed.init()
    try:
        ok, err = True, None
        try:
            check_grader(args.grade)
            check_engine_args(args)
            apply_threads(args)
            store = ResultStore(args.output, info.rank, info.world_size)
            store.check_fresh(args.resume)
            with open(args.input, encoding="utf-8") as f:
                lines = f.read().splitlines()
            from .engine import Engine
            from .loader import load
            from .params import SamplingParams

            model, tok = load(args.model, device=distributed.device_for(info, args.device), dtype=args.dtype)
            if info.is_main:
                note_slow_dtype(model)
            engine = Engine(model, tok, max_batch=args.max_batch, max_len=args.max_len,
                            cuda_graphs=args.cuda_graphs)
            defaults = {_CLI_TO_FIELD[k]: v for k, v in vars(args).items() if k in _CLI_TO_FIELD and v is not None}
            SamplingParams(**defaults)  # fail early on bad command-line parameters
        except (PowerSampleError, OSError) as e:
            ok, err = False, e
        if not distributed.all_ok(info, ok):
            print(f"powersample-fast: error: {err or 'another rank failed to start'}", file=sys.stderr)
            distributed.finish(info)
            return 2
        done_ids, done_lines = store.done() if args.resume else (set(), set())
        todo, first_line = [], {}
        for no, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            item = parse_line(no, raw, defaults, tok, args.chat, SamplingParams)
            if isinstance(item, Job):  # duplicates are found on every rank, whoever owns the line
                prev = first_line.setdefault(str(item.id), no)
                if prev != no:
                    item = {"line": no, "id": item.id, "error": f"line {no}: duplicate id {item.id!r} (first on line {prev})"}
            if not info.owns(no) or no in done_lines or (isinstance(item, Job) and str(item.id) in done_ids):
                continue
            todo.append(item)
        tokens, wall = _run(engine, store, todo, args, info)
    except KeyboardInterrupt:
        print("powersample-fast: interrupted; continue with --resume", file=sys.stderr)
        return 130
    parts = distributed.gather(info, (tokens, wall))
    distributed.barrier(info)
    if info.is_main:  # tokens/s: all ranks' tokens over the slowest rank's sampling time
        summary = summarize(store.merge(), sum(p[0] for p in parts), max(p[1] for p in parts))
        with open(f"{args.output}.summary.json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        print("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in summary.items()), file=sys.stderr)
    distributed.finish(info)
    return 0


def _run(engine, store: ResultStore, todo: list, args, info):
    """Feed the engine, append each record as its request finishes. Returns (tokens sampled, seconds)."""
    from tqdm.auto import tqdm

    store.open()
    bar = tqdm(total=len(todo), desc=f"rank {info.rank}" if info.world_size > 1 else "lines", unit="line",
               disable=args.no_progress or not info.is_main, dynamic_ncols=True)
    pending, inflight = deque(todo), {}
    cap = 4 * (args.max_batch or 64)  # requests handed to the engine ahead of time
    tokens, graded, correct, t0 = 0, 0, 0, time.perf_counter()
    try:
        while pending or inflight:
            while pending and len(inflight) < cap:
                job = pending.popleft()
                if not isinstance(job, Job):
                    store.append(job)
                    bar.update(1)
                    continue
                try:
                    inflight[engine.add_request(job.ids, job.params, prompt_index=job.prompt_index)] = job
                except ConfigError as e:  # too long for the context, out-of-vocabulary ids
                    store.append({"line": job.line, "id": job.id, "error": f"line {job.line}: {e}"})
                    bar.update(1)
            if not inflight:
                continue
            for o in engine.step():
                if not o.finished:
                    continue
                job = inflight.pop(o.request_id)
                if o.error is not None:
                    rec = {"line": job.line, "id": job.id, "error": f"line {job.line}: {type(o.error).__name__}: {o.error}"}
                else:
                    rec = record(job, o.results, args.grade)
                    tokens += sum(r.stats.get("tokens_sampled", 0) for r in o.results)
                    if "num_correct" in rec:  # running accuracy, as in the summary: mean over lines
                        graded, correct = graded + 1, correct + rec["num_correct"] / len(rec["samples"])
                store.append(rec)
                bar.update(1)
                post = {"tok/s": f"{tokens / max(time.perf_counter() - t0, 1e-9):.0f}"}
                if graded:
                    post["acc"] = f"{correct / graded:.3f}"
                bar.set_postfix(post, refresh=False)
    finally:
        bar.close()
        store.close()
    return tokens, time.perf_counter() - t0
