"""Issue 19, `run`'s output: never the input (same path, symlink, hard link); --resume keeps a whole
last record without its newline, retries lines that ended in an error, refuses other settings unless
--force-resume; output paths that cannot work are one line before the model loads; a write error
mid-run (disk full) or at the final merge is one line and keeps every record written."""
import errno
import json
import os

import pytest

from powersample_fast.models import loader as loader_mod
from powersample_fast.entrypoints.batch import results_store
from powersample_fast.entrypoints.cli import startup as cli_startup
from test_batch_input import MH, records, run, write
from helpers.tiny_models import make_random_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"id": f"p{i}", "prompt": f"problem {i}:"} for i in range(5)]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return make_random_model_dir(tmp_path_factory.mktemp("rand"))


def no_timings(recs):
    for r in recs:
        for s in r.get("samples", []):
            s["stats"] = {k: v for k, v in s["stats"].items() if not k.endswith("_s")}
    return recs


def summary(out):
    return json.loads(out.with_name(out.name + ".summary.json").read_text())


def one_line(capsys):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_output_that_is_the_input_is_refused(random_model, tmp_path, capsys, how):
    inp = write(tmp_path / "in.jsonl", ["# a comment", "{not json", *ROWS])
    before = inp.read_bytes()
    out = tmp_path / "out.jsonl"
    if how == "same":
        out = inp
    else:
        (os.symlink if how == "symlink" else os.link)(inp, out)
    assert run("--model", random_model, "--input", inp, "--output", out, "--resume", *MH) == 2
    assert f"--output {out} would overwrite the --input {inp}" in one_line(capsys)
    assert inp.read_bytes() == before


def test_resume_keeps_a_whole_last_record_without_its_newline(random_model, tmp_path, capsys):
    inp, out = write(tmp_path / "in.jsonl", ROWS), tmp_path / "out.jsonl"
    assert run("--model", random_model, "--input", inp, "--output", out, *MH) == 0
    ref = no_timings(records(out))
    out.write_bytes(out.read_bytes().rstrip(b"\n"))  # e.g. written by a tool that omits the last newline
    assert run("--model", random_model, "--input", inp, "--output", out, "--resume", *MH) == 0
    assert no_timings(records(out)) == ref and summary(out)["ok"] == 5
    assert "warning" not in capsys.readouterr().err
    with open(out, "ab") as f:  # a record cut short by a crash is dropped and its line runs again
        f.write(b'{"line": 9, "id": "p9", "par')
    assert run("--model", random_model, "--input", inp, "--output", out, "--resume", *MH) == 0
    assert no_timings(records(out)) == ref


def test_resume_retries_lines_that_ended_in_an_error(random_model, tmp_path):
    rows = [ROWS[0], {"id": "typo", "prompt": "x", "alhpa": 2}, {"id": "dup", "prompt": "y"},
            {"id": "dup", "prompt": "z"}, "{broken"]
    inp, out = write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert run("--model", random_model, "--input", inp, "--output", out, *MH) == 0
    assert [("error" in r) for r in records(out)] == [False, True, False, True, True]
    rows[1], rows[4] = {"id": "typo", "prompt": "x", "alpha": 2}, {"id": "fixed", "prompt": "w"}  # input fixed
    write(inp, rows)
    assert run("--model", random_model, "--input", inp, "--output", out, "--resume", *MH) == 0
    recs = records(out)
    assert [(r["line"], "error" in r) for r in recs] == [(1, False), (2, False), (3, False), (4, True), (5, False)]
    assert recs[1]["params"]["alpha"] == 2.0 and recs[3]["error"] == "line 4 (id 'dup'): duplicate id (first on line 3)"
    assert summary(out)["errors"] == 1 and summary(out)["ok"] == 4


def test_resume_with_other_settings_is_refused_unless_forced(random_model, tmp_path, capsys):
    inp, out = write(tmp_path / "in.jsonl", ROWS[:2]), tmp_path / "out.jsonl"
    assert run("--model", random_model, "--input", inp, "--output", out, "--alpha", "4", *MH) == 0
    settings = json.loads((tmp_path / "out.jsonl.run.json").read_text())
    assert settings["alpha"] == 4.0 and settings["model"] == str(random_model) and settings["chat"] is None
    write(inp, ROWS[:3])
    before = out.read_bytes()
    capsys.readouterr()
    assert run("--model", random_model, "--input", inp, "--output", out, "--resume", "--alpha", "2", "--no-chat",
               *MH) == 2
    err = one_line(capsys)
    assert "--resume with other settings than the run in" in err and "alpha 4.0 -> 2.0; chat None -> False" in err
    assert "--force-resume" in err and out.read_bytes() == before
    assert run("--model", random_model, "--input", inp, "--output", out, "--resume", *MH) == 0  # same flags
    assert run("--model", random_model, "--input", inp, "--output", out, "--resume", "--alpha", "2",
               "--force-resume", *MH) == 0
    assert json.loads((tmp_path / "out.jsonl.run.json").read_text())["alpha"] == 2.0


def _erofs(real, path):
    def fake_open(p, *a, **k):
        if str(p) == str(path):
            raise OSError(errno.EROFS, "Read-only file system", str(p))
        return real(p, *a, **k)
    return fake_open


@pytest.mark.parametrize("where", ["directory", "under_a_file", "device", "read_only"])
def test_output_paths_that_cannot_work_are_one_line_before_loading(random_model, tmp_path, monkeypatch, capsys,
                                                                    where):
    monkeypatch.setattr(loader_mod, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    inp = write(tmp_path / "in.jsonl", ROWS[:1])
    (tmp_path / "afile").write_text("x")
    out = {"directory": tmp_path, "under_a_file": tmp_path / "afile" / "sub" / "out.jsonl", "device": "/dev/null",
           "read_only": tmp_path / "ro.jsonl"}[where]
    if where == "read_only":
        monkeypatch.setattr(cli_startup, "open", _erofs(open, out), raising=False)  # where the write probe opens it
    assert run("--model", random_model, "--input", inp, "--output", out, *MH) == 2
    err = one_line(capsys)
    assert {"directory": "is a directory; give a file name such as",
            "under_a_file": f"{tmp_path / 'afile'} is a file, not a directory",
            "device": "is not a regular file", "read_only": "(Read-only file system)"}[where] in err


def test_output_under_a_missing_directory_is_created(random_model, tmp_path):
    inp, out = write(tmp_path / "in.jsonl", ROWS[:1]), tmp_path / "new" / "dir" / "out.jsonl"
    assert run("--model", random_model, "--input", inp, "--output", out, *MH) == 0
    assert records(out)[0]["id"] == "p0"


def test_disk_full_mid_run_is_one_line_and_keeps_the_records(random_model, tmp_path, monkeypatch, capsys):
    inp, ref = write(tmp_path / "in.jsonl", ROWS), tmp_path / "ref.jsonl"
    assert run("--model", random_model, "--input", inp, "--output", ref, *MH) == 0
    out, calls, real = tmp_path / "out.jsonl", [], os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    capsys.readouterr()
    assert run("--model", random_model, "--input", inp, "--output", out, *MH) == 1
    assert one_line(capsys) == (f"powersample-fast: error: cannot write {out}: No space left on device; the 2 "
                                "records written before are kept; free space (or fix the path) and continue with "
                                "--resume")
    assert len(records(out)) >= 2
    monkeypatch.setattr(os, "fsync", real)
    assert run("--model", random_model, "--input", inp, "--output", out, "--resume", *MH) == 0
    assert no_timings(records(out)) == no_timings(records(ref))


def test_merge_failure_is_one_line_and_keeps_the_output(random_model, tmp_path, monkeypatch, capsys):
    inp, out = write(tmp_path / "in.jsonl", ROWS[:2]), tmp_path / "out.jsonl"

    def full(path, recs):
        path.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(results_store, "_write", full)
    assert run("--model", random_model, "--input", inp, "--output", out, *MH) == 1
    assert "cannot rewrite" in one_line(capsys) and not (tmp_path / "out.jsonl.tmp").exists()
    assert sorted(r["id"] for r in records(out)) == ["p0", "p1"]  # as appended


def test_resume_refuses_a_file_that_is_not_a_run_output(random_model, tmp_path, capsys):
    inp = write(tmp_path / "in.jsonl", ROWS)
    other = write(tmp_path / "other.jsonl", ROWS)  # e.g. a copy of the problems
    before = other.read_bytes()
    assert run("--model", random_model, "--input", inp, "--output", other, "--resume", *MH) == 2
    assert "is not the output of a `run`" in one_line(capsys) and other.read_bytes() == before


def test_input_lines_without_a_record_are_warned_about(random_model, tmp_path, monkeypatch, capsys):
    inp, out = write(tmp_path / "in.jsonl", ROWS[:3]), tmp_path / "out.jsonl"
    real = results_store.ResultStore.append
    monkeypatch.setattr(results_store.ResultStore, "append",
                        lambda self, rec: None if rec.get("id") == "p1" else real(self, rec))  # a lost record
    assert run("--model", random_model, "--input", inp, "--output", out, *MH) == 0
    assert ("warning: 1 input line(s) have no record (first: line 2); run again with --resume"
            in capsys.readouterr().err)
