"""Issue 19, `run`'s input: every bad line is an error record naming its line and id and the run goes
on (lone surrogates, typo'd parameters, n / mcmc_steps over the limits, tiny temperatures, prompts too
long); encodings (UTF-8 BOM, UTF-16 with a BOM, CRLF, U+2028 inside a string, a line that is not
UTF-8) and files that are not text (one line); --threads capped."""
import json
import re

import pytest
import torch

from powersample_fast.entrypoints import work_limits
from powersample_fast.entrypoints.cli import main as cli, startup as cli_setup
from powersample_fast.models import loader as loader_mod
from helpers.tiny_models import make_random_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

MH = ["--max-new-tokens", "8", "--block-size", "4", "--steps", "1", "--max-batch", "2", "--no-progress"]


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return make_random_model_dir(tmp_path_factory.mktemp("rand"))


def run(*args):
    return cli.main(["run", *map(str, args)])


def write(path, rows, encoding="utf-8"):
    """rows: dicts (JSON, non-ASCII kept raw) or raw str lines."""
    text = "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows)
    path.write_bytes(text.encode(encoding) if isinstance(encoding, str) else encoding(text))
    return path


def records(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_bad_lines_are_error_records_and_the_run_goes_on(random_model, tmp_path, monkeypatch):
    monkeypatch.setattr(work_limits, "available_memory", lambda: 8 * 2 ** 30)
    rows = [{"id": "ok1", "prompt": "abc"},
            '{"id": "sur", "prompt": "a\\ud800b"}',  # a JSON escape that decodes to a lone surrogate
            '{"id": "msur", "messages": [{"role": "user", "content": "\\udfff"}]}',
            {"id": "typos", "prompt": "x", "mcmc_step": 50, "alhpa": 9},
            {"id": "flag-name", "prompt": "x", "steps": 3},
            {"id": "big-n", "prompt": "x", "n": 10 ** 9},
            {"id": "big-steps", "prompt": "x", "mcmc_steps": 10 ** 9},
            {"id": "tiny-t", "prompt": "x", "proposal_temperature": 1e-300},
            {"id": 7, "prompt": "z" * 250},
            {"id": "meta", "prompt": "abc", "subject": "algebra", "level": 3},
            {"id": "ok2", "prompt": "abd"}]
    inp, out = write(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    assert run("--model", random_model, "--input", inp, "--output", out, *MH) == 0
    by_line = {r["line"]: r for r in records(out)}
    err = {n: r["error"] for n, r in by_line.items() if "error" in r}
    assert sorted(err) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert err[2] == "line 2 (id 'sur'): the prompt is not valid text (a lone surrogate U+D800 at character 1)"
    assert err[3].startswith("line 3 (id 'msur'): the messages is not valid text (a lone surrogate U+DFFF")
    assert err[4] == ("line 4 (id 'typos'): unknown parameters 'mcmc_step' (did you mean 'mcmc_steps'?), "
                      "'alhpa' (did you mean 'alpha'?)")
    assert err[5] == "line 5 (id 'flag-name'): unknown parameter 'steps'; did you mean 'mcmc_steps'?"
    assert err[6].startswith("line 6 (id 'big-n'): 1,000,000,000 chains (1 prompt x n=1,000,000,000) need at "
                             "least 715 GiB of memory")
    assert "over the limit of 1e+09" in err[7] and "pass --allow-long" in err[7]
    assert err[8].startswith("line 8 (id 'tiny-t'): ")
    assert err[9].startswith("line 9 (id 7): the prompt has ") and "context of 256" in err[9]
    assert not any(re.search(r"prompt \d{4,}", e) for e in err.values()), err  # no seed-key hash
    assert [by_line[n]["id"] for n in (1, 10, 11)] == ["ok1", "meta", "ok2"]
    assert all(len(by_line[n]["samples"][0]["token_ids"]) == 8 for n in (1, 10, 11))


def test_allow_long_runs_a_line_over_the_token_limit(random_model, tmp_path, monkeypatch):
    monkeypatch.setattr(work_limits, "MAX_PLANNED_TOKENS", 20)  # a line of n=2 x 8 plain tokens is fine, n=3 not
    inp = write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x", "n": 2}, {"id": "b", "prompt": "x", "n": 3}])
    args = ["--model", random_model, "--input", inp, "--method", "plain", *MH]
    assert run(*args, "--output", tmp_path / "o1.jsonl") == 0
    assert ["error" in r for r in records(tmp_path / "o1.jsonl")] == [False, True]
    assert run(*args, "--output", tmp_path / "o2.jsonl", "--allow-long") == 0
    assert [len(r["samples"]) for r in records(tmp_path / "o2.jsonl")] == [2, 3]


@pytest.mark.parametrize("flags,match", [
    (["--n", "1000000000"], "need at least 715 GiB of memory"),
    (["--steps", "1000000000"], "pass --allow-long"),
])
def test_run_flags_over_the_limits_are_one_line_before_loading(random_model, tmp_path, monkeypatch, capsys,
                                                                flags, match):
    monkeypatch.setattr(work_limits, "available_memory", lambda: 8 * 2 ** 30)
    monkeypatch.setattr(loader_mod, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    inp = write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    assert run("--model", random_model, "--input", inp, "--output", tmp_path / "o.jsonl", *MH, *flags) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err


GOOD = [{"id": "a", "prompt": "abc"}, {"id": "b", "prompt": "ab\u2028c"}]  # U+2028: not a line break in JSONL


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-32", "crlf"])
def test_encodings_and_line_ends(random_model, tmp_path, encoding):
    enc = (lambda t: t.replace("\n", "\r\n").encode()) if encoding == "crlf" else encoding
    inp, out = write(tmp_path / "in.jsonl", GOOD, enc), tmp_path / "out.jsonl"
    assert run("--model", random_model, "--input", inp, "--output", out, "--method", "plain", *MH) == 0
    recs = records(out)
    assert [(r["line"], r["id"]) for r in recs] == [(1, "a"), (2, "b")] and not any("error" in r for r in recs)


def test_a_line_that_is_not_utf8_is_an_error_record(random_model, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b'{"id": "a", "prompt": "abc"}\n{"id": "b", "prompt": "caf\xe9"}\n{"id": "c", "prompt": "x"}\n')
    assert run("--model", random_model, "--input", inp, "--output", out, "--method", "plain", *MH) == 0
    recs = records(out)
    assert recs[1] == {"line": 2, "error": "line 2: not valid UTF-8 (byte 0xe9 at byte 27); the input must be "
                                           "UTF-8 JSONL"}
    assert [r.get("id") for r in recs] == ["a", None, "c"] and "samples" in recs[2]


@pytest.mark.parametrize("content", [
    "\n".join(json.dumps(r) for r in GOOD).encode("utf-16-le"),  # UTF-16 without a byte-order mark
    bytes(range(256)) * 8,  # binary
])
def test_a_file_that_is_not_text_is_one_line(random_model, tmp_path, capsys, content):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(content)
    assert run("--model", random_model, "--input", inp, "--output", tmp_path / "o.jsonl", *MH) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is not UTF-8 text (it has NUL bytes" in err
    assert not (tmp_path / "o.jsonl").exists()


def test_threads_capped(random_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_setup, "usable_cores", lambda: 1)
    inp = write(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    assert run("--model", random_model, "--input", inp, "--output", tmp_path / "o.jsonl", *MH,
               "--threads", "10000") == 0
    assert torch.get_num_threads() == 1 and "--threads 10000 capped to 1" in capsys.readouterr().err


def test_an_input_that_never_ends_is_one_line(tmp_path, monkeypatch):
    # `--input /dev/urandom` (or a FIFO) read without end; the read is bounded now
    from powersample_fast.entrypoints.batch import input_lines
    from powersample_fast.errors import ConfigError

    monkeypatch.setattr(input_lines, "MAX_INPUT_BYTES", 4096)
    with pytest.raises(ConfigError, match=r"over the 4,096-byte limit \(or never ends\)"):
        input_lines.read_lines("/dev/zero")
    p = tmp_path / "ok.jsonl"
    p.write_text('{"id": 1, "prompt": "x"}\n')
    assert input_lines.read_lines(p) == ['{"id": 1, "prompt": "x"}']
