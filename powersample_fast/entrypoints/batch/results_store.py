"""The JSONL output of `powersample-fast run`: append as requests finish, resume, merge in input order.

Every record has `line` (1-based input line) and, when the line had one, `id`. A record with `error`
stands for a line that cannot run (malformed, duplicate id, rejected parameters) or failed; a result
is keyed by its id. With one process, records go straight into the output; under torchrun each rank
appends to `OUTPUT.part-RANK`, and the final merge reads the output and every part (also those of an
earlier, interrupted run with another number of ranks), keeps the first result per id and the latest
record per line (a line that failed and then succeeded on `--resume` keeps only its result), and
rewrites the output in input order. `OUTPUT.run.json` holds the run's settings (model, dtype, chat,
grading, sampling flags): `--resume` with other ones is refused unless forced.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, List, Set

from ...errors import ConfigError
from ..cli.startup import cannot_write


def read_records(path: Path) -> List[dict]:
    """Records of a JSONL file; a line cut short by a crash (not valid JSON) is skipped."""
    out = []
    if not path.exists():
        return out
    with open(path, encoding="utf-8") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


class ResultStore:
    def __init__(self, output, rank: int = 0, world_size: int = 1):
        self.output = Path(output)
        self.rank, self.world_size = rank, world_size
        self.path = self.output if world_size == 1 else self.part(rank)
        self.written = 0  # records appended by this process
        self._f = None

    def part(self, rank: int) -> Path:
        return self.output.with_name(f"{self.output.name}.part-{rank}")

    def parts(self) -> List[Path]:
        return sorted(self.output.parent.glob(f"{self.output.name}.part-*"))

    def sidecar(self, suffix: str) -> Path:
        """OUTPUT.summary.json, OUTPUT.run.json, OUTPUT.tmp."""
        return self.output.with_name(f"{self.output.name}.{suffix}")

    def check_paths(self, input_path) -> None:
        """Before anything loads: the output is a regular file (or absent) that is not the input, under
        a directory that exists (created if missing) and can be written. One-line ConfigErrors."""
        out, inp = self.output, Path(input_path)
        if out.is_dir():
            raise ConfigError(f"--output {out} is a directory; give a file name such as {out / 'results.jsonl'}")
        if out.exists() and not out.is_file():
            raise ConfigError(f"--output {out} is not a regular file; the output is rewritten in input order at "
                              "the end, so give a file path")
        for p in (out, self.sidecar("summary.json"), self.sidecar("run.json"), self.sidecar("tmp")):
            if inp.exists() and p.exists() and os.path.samefile(p, inp):
                how = "" if p.resolve() == inp.resolve() else " (the same file through a link)"
                raise ConfigError(f"--output {out} would overwrite the --input {inp}{how}; choose another --output")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            file = next((p for p in [out.parent, *out.parent.parents] if p.exists() and not p.is_dir()), None)
            why = f"{file} is a file, not a directory" if file else e.strerror or str(e)
            raise ConfigError(f"cannot create the directory {out.parent} for --output {out}: {why}") from None
        probes = [self.path] + ([self.sidecar("tmp")] if self.rank == 0 else [])
        for p in probes:
            why = cannot_write(p)
            if why is not None:
                raise ConfigError(f"--output {out}: cannot write {p} ({why}); choose a path in a writable directory")

    def check_fresh(self, resume: bool):
        """Refuse to mix a new run into old results unless resuming, and to resume a file that is not
        a `run` output (its lines would count as done, and the final rewrite would drop them)."""
        old = [p for p in [self.output, *self.parts()] if p.exists() and p.stat().st_size > 0]
        if old and not resume:
            raise ConfigError(f"{old[0]} already holds results; pass --resume to continue that run, "
                              "or remove it (and any .part-* files) to start over")
        for p in old:
            bad = next((r for r in read_records(p) if not isinstance(r.get("line"), int)
                        or ("error" not in r and not isinstance(r.get("samples"), list))), None)
            if bad is not None:
                raise ConfigError(f"{p} is not the output of a `run` (it has a record without \"line\" and "
                                  "\"samples\" or \"error\"); choose another --output")

    def check_settings(self, settings: dict, resume: bool, force: bool) -> None:
        """On --resume, refuse settings other than those in OUTPUT.run.json (unless force)."""
        path = self.sidecar("run.json")
        if not resume or not path.exists():
            return
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(old, dict):
                raise ValueError
        except (OSError, ValueError):
            raise ConfigError(f"cannot read {path}, the settings of the run in {self.output}; remove it to resume "
                              "without comparing them") from None
        new = json.loads(json.dumps(settings))
        diff = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        if diff and not force:
            raise ConfigError(f"--resume with other settings than the run in {self.output} ({'; '.join(diff)}): its "
                              "records would mix both; pass the same flags, or --force-resume to mix them anyway, "
                              "or choose another --output")

    def save_settings(self, settings: dict) -> None:
        tmp, path = self.sidecar("run.json.tmp"), self.sidecar("run.json")
        tmp.write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def done(self) -> Set[str]:
        """Ids with a result in the output and all part files (lines with an error record run again)."""
        return {str(rec.get("id")) for p in [self.output, *self.parts()] for rec in read_records(p) if "error" not in rec}

    def open(self):
        """Open this process's file for appending. A last line without its newline is completed when it is
        a whole record (`done()` counts it) and dropped when a crash cut it short."""
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb+") as f:
                data = f.read()
                if not data.endswith(b"\n"):
                    tail = data[data.rfind(b"\n") + 1:]
                    try:
                        whole = isinstance(json.loads(tail), dict)
                    except ValueError:
                        whole = False
                    if whole:
                        f.write(b"\n")
                    else:
                        f.truncate(len(data) - len(tail))
        self._f = open(self.path, "a", encoding="utf-8")
        return self

    def append(self, rec: dict):
        """Write one record durably (flush + fsync): a crash loses only requests still running."""
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.written += 1

    def close(self):
        """Close this process's file; after a write error (disk full) the unwritten rest is dropped."""
        if self._f is not None:
            f, self._f = self._f, None
            try:
                f.close()
            except OSError:
                pass

    def merge(self) -> List[dict]:
        """Rank 0, after every rank has closed its file: output + parts -> output in input order. Keeps
        the first result per id, and an error record only when it is the last record of its line
        (files in the order written: the output, then the parts). Raises ConfigError when the output
        cannot be rewritten; it is then left as it was."""
        results, last, recs = set(), {}, []
        for p in [self.output, *self.parts()]:
            for rec in read_records(p):
                if "error" not in rec:
                    if str(rec.get("id")) in results:
                        continue
                    results.add(str(rec.get("id")))
                recs.append(rec)
                last[rec.get("line")] = rec
        recs = [r for r in recs if "error" not in r or last[r.get("line")] is r]
        recs.sort(key=lambda r: (r.get("line") if isinstance(r.get("line"), int) else 0, "error" in r))
        tmp = self.sidecar("tmp")
        try:
            _write(tmp, recs)
            os.replace(tmp, self.output)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise ConfigError(f"cannot rewrite {self.output} in input order ({e.strerror or e}); its records are "
                              "kept as written: free space and run again with --resume") from None
        for p in self.parts():
            p.unlink()
        return recs


def _write(path: Path, recs: Iterable[dict]):
    with open(path, "w", encoding="utf-8") as f:
        for rec in recs:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
