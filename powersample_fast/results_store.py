"""The JSONL output of `powersample-fast run`: append as requests finish, resume, merge in input order.

Every record has `line` (1-based input line) and, when the line had one, `id`. A record with `error`
stands for a line that cannot run (malformed, duplicate id, rejected parameters) or failed; it is keyed
by its line, a result by its id. With one process, records go straight into the output; under torchrun
each rank appends to `OUTPUT.part-RANK`, and the final merge reads the output and every part (also
those of an earlier, interrupted run with another number of ranks), keeps the first record per key,
and rewrites the output in input order.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, List, Set, Tuple

from .errors import ConfigError


def key(rec: dict):
    return ("line", rec.get("line")) if "error" in rec else ("id", str(rec.get("id")))


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
        self._f = None

    def part(self, rank: int) -> Path:
        return self.output.with_name(f"{self.output.name}.part-{rank}")

    def parts(self) -> List[Path]:
        return sorted(self.output.parent.glob(f"{self.output.name}.part-*"))

    def check_fresh(self, resume: bool):
        """Refuse to mix a new run into old results unless resuming."""
        old = [p for p in [self.output, *self.parts()] if p.exists() and p.stat().st_size > 0]
        if old and not resume:
            raise ConfigError(f"{old[0]} already holds results; pass --resume to continue that run, "
                              "or remove it (and any .part-* files) to start over")

    def done(self) -> Tuple[Set[str], Set[int]]:
        """(ids with a result, lines with an error record) in the output and all part files."""
        ids, lines = set(), set()
        for p in [self.output, *self.parts()]:
            for rec in read_records(p):
                if "error" in rec:
                    lines.add(rec.get("line"))
                else:
                    ids.add(str(rec.get("id")))
        return ids, lines

    def open(self):
        """Open this process's file for appending, first dropping a last line cut short by a crash."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb+") as f:
                data = f.read()
                if not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)
        self._f = open(self.path, "a", encoding="utf-8")
        return self

    def append(self, rec: dict):
        """Write one record durably (flush + fsync): a crash loses only requests still running."""
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def merge(self) -> List[dict]:
        """Rank 0, after every rank has closed its file: output + parts -> output in input order."""
        seen, recs = set(), []
        for p in [self.output, *self.parts()]:
            for rec in read_records(p):
                if key(rec) not in seen:
                    seen.add(key(rec))
                    recs.append(rec)
        recs.sort(key=lambda r: (r.get("line") or 0, "error" in r))
        tmp = self.output.with_name(self.output.name + ".tmp")
        _write(tmp, recs)
        os.replace(tmp, self.output)
        for p in self.parts():
            p.unlink()
        return recs


def _write(path: Path, recs: Iterable[dict]):
    with open(path, "w", encoding="utf-8") as f:
        for rec in recs:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
