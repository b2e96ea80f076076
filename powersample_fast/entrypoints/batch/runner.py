"""`powersample-fast run`: power-sample a JSONL file of problems on one engine, resumably.

Input lines: `{"id": ..., "prompt": "..." | [token ids], or "messages": [...], optional parameters
(any SamplingParams field: method, alpha, mcmc_steps, n, seed, ...), optional "answer"}` (parsing:
`input_lines.py`). All lines share one running decode batch; each line's record is appended as soon
as its request finishes, so a crash loses only the requests in flight and `--resume` skips the ids
already done (lines that ended in an error record run again). A line that cannot run (bad JSON, a
typo'd parameter, too much work, a prompt the tokenizer rejects) gets an error record and the run
goes on. At the end the output is rewritten in input order and a summary is printed. Under torchrun
the lines are sharded over ranks (see `distributed.py`).
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import deque
from typing import Optional

from . import distributed
from .input_lines import Job, error_record, parse_line, read_lines
from ..cli.sampling_flags import add_sampling_args, sampling_args
from ..cli.startup import add_engine_args, apply_backend, apply_threads, check_engine_args, note_slow_dtype
from ...errors import PowerSampleError
from .grading import GRADERS, check_grader, grade_math, pass_at_k
from .results_store import ResultStore
from ..work_limits import check_work



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
    r.add_argument("--resume", action="store_true", help="continue the run in --output: skip the ids that have a result; lines that ended "
                        "in an error record run again (the same flags are required, see --force-resume)")
    r.add_argument("--grade", choices=GRADERS, default=None, help="grade each sample against the line's \"answer\"")
    chat = r.add_mutually_exclusive_group()
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="wrap string prompts in the model's chat template (default: when the tokenizer has one, "
                           "as `sample` does; \"messages\" lines always are, token-id prompts never)")
    chat.add_argument("--no-chat", dest="chat", action="store_false", help="give string prompts to the model as they are")
    add_sampling_args(r)  # the command-line values are each line's defaults
    r.add_argument("--allow-long", action="store_true",
                   help="run lines that plan more than 1e9 decode tokens (refused by default: an error record)")
    r.add_argument("--force-resume", action="store_true",
                   help="--resume even when the model, dtype, chat or sampling flags differ from the run's "
                        "(stored in OUTPUT.run.json)")
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
            store = ResultStore(args.output, info.rank, info.world_size)
            store.check_paths(args.input)
            store.check_fresh(args.resume)
            lines = read_lines(args.input)
            from ...sampling_params import SamplingParams

            defaults = sampling_args(args)
            if defaults["seed"] is None:  # reproducible by default: a rerun or --resume gives the same records
                defaults["seed"] = 0
            check_work(SamplingParams(**defaults), 1, allow_long=args.allow_long, override="--allow-long")
            apply_threads(args)
            from ...engine import Engine
            from ...models.loader import load

            device = distributed.device_for(info, args.device)
            from ...device import resolve_device

            apply_backend(args, resolve_device(device))
            model, tok = load(args.model, device=device, dtype=args.dtype)
            if info.is_main:
                note_slow_dtype(model)
            settings = {"model": args.model, "dtype": str(model.dtype).replace("torch.", ""), "chat": args.chat,
                        "grade": args.grade, **dataclasses.asdict(SamplingParams(**defaults))}
            store.check_settings(settings, args.resume, args.force_resume)
            if info.is_main:
                store.save_settings(settings)
            engine = Engine(model, tok, max_batch=args.max_batch, max_len=args.max_len,
                            cuda_graphs=args.cuda_graphs)
        except (PowerSampleError, OSError) as e:
            ok, err = False, e
        if not distributed.all_ok(info, ok):
            print(f"powersample-fast: error: {err or 'another rank failed to start'}", file=sys.stderr)
            distributed.finish(info)
            return 2
        done_ids = store.done() if args.resume else set()
        todo, first_line, line_ids = [], {}, {}
        for no, raw in enumerate(lines, start=1):
            if isinstance(raw, str) and not raw.strip():
                continue
            item = parse_line(no, raw, defaults, tok, args.chat, SamplingParams, args.allow_long)
            if isinstance(item, Job):  # duplicates are found on every rank, whoever owns the line
                line_ids[no] = str(item.id)
                prev = first_line.setdefault(str(item.id), no)
                if prev != no:
                    item = error_record(no, f"duplicate id (first on line {prev})", item.id)
            if not info.owns(no) or (isinstance(item, Job) and str(item.id) in done_ids):
                continue
            todo.append(item)
        tokens, wall, werr = _run(engine, store, todo, args, info)
    except KeyboardInterrupt:
        print("powersample-fast: interrupted; continue with --resume", file=sys.stderr)
        return 130
    if werr:
        print(f"powersample-fast: error: {werr}", file=sys.stderr)
    parts = distributed.gather(info, (tokens, wall, werr))
    distributed.barrier(info)
    rc = 1 if werr else 0
    if info.is_main:
        rc = max(rc, _finish(store, parts, lines, line_ids))
    distributed.finish(info)
    return rc


def _finish(store: ResultStore, parts, lines, line_ids) -> int:
    """Rank 0: merge, write the summary, warn about input lines without a record. Returns the exit code."""
    if any(p[2] for p in parts):  # each rank printed its write error; the records stay where they were written
        return 1
    try:  # tokens/s: all ranks' tokens over the slowest rank's sampling time
        recs = store.merge()
        summary = summarize(recs, sum(p[0] for p in parts), max(p[1] for p in parts))
        with open(store.sidecar("summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    except (PowerSampleError, OSError) as e:
        print(f"powersample-fast: error: {e}", file=sys.stderr)
        return 1
    print("summary: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in summary.items()), file=sys.stderr)
    have_lines = {r.get("line") for r in recs}
    have_ids = {str(r.get("id")) for r in recs if "error" not in r}
    missing = [no for no, raw in enumerate(lines, start=1) if not (isinstance(raw, str) and not raw.strip())
               and no not in have_lines and line_ids.get(no) not in have_ids]
    if missing:
        print(f"powersample-fast: warning: {len(missing)} input line(s) have no record (first: line {missing[0]}); "
              "run again with --resume", file=sys.stderr)
    return 0


def _run(engine, store: ResultStore, todo: list, args, info):
    """Feed the engine, append each record as its request finishes. Returns (tokens sampled, seconds,
    None or the message of a write error, which ends the run: the records written before stay)."""
    from tqdm.auto import tqdm

    from ...device import resolve_max_batch

    bar = tqdm(total=len(todo), desc=f"rank {info.rank}" if info.world_size > 1 else "lines", unit="line",
               disable=args.no_progress or not info.is_main, dynamic_ncols=True)
    pending, inflight = deque(todo), {}
    cap = 4 * resolve_max_batch(args.max_batch, engine.device)  # requests handed to the engine ahead of time
    tokens, graded, correct, t0, werr = 0, 0, 0, time.perf_counter(), None
    try:
        store.open()
        while pending or inflight:
            while pending and len(inflight) < cap:
                job = pending.popleft()
                if not isinstance(job, Job):
                    store.append(job)
                    bar.update(1)
                    continue
                try:
                    inflight[engine.add_request(job.ids, job.params, prompt_index=job.prompt_index)] = job
                except PowerSampleError as e:  # too long for the context, out-of-vocabulary ids
                    store.append(job.error(str(e)))
                    bar.update(1)
            if not inflight:
                continue
            for o in engine.step():
                if not o.finished:
                    continue
                job = inflight.pop(o.request_id)
                if o.error is not None:
                    rec = job.error(f"{type(o.error).__name__}: {o.error}")
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
    except OSError as e:
        werr = (f"cannot write {store.path}: {e.strerror or e}; the {store.written} records written before are "
                "kept; free space (or fix the path) and continue with --resume")
    finally:
        bar.close()
        store.close()
    return tokens, time.perf_counter() - t0, werr
