"""`powersample-fast run`: good, malformed and duplicate lines; kill + --resume equals an
uninterrupted run; --grade math on hand-written answers (boxed, fractions, equivalent forms)."""
import json
import signal
import subprocess
import time

import pytest

from powersample_fast.entrypoints.cli import main as cli
from helpers.tiny_models import cli_command, make_oracle_model_dir, make_random_model_dir, subprocess_env

pytestmark = pytest.mark.usefixtures("one_thread")

MH = ["--max-new-tokens", "24", "--block-size", "8", "--steps", "2", "--max-batch", "2", "--no-progress"]


def run(*args):
    return cli.main(["run", *map(str, args)])


def records(path):
    """Output records without their timings (the only part that differs between runs)."""
    out = []
    for line in open(path):
        r = json.loads(line)
        for s in r.get("samples", []):
            s["stats"] = {k: v for k, v in s["stats"].items() if not k.endswith("_s")}
        out.append(r)
    return out


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return make_random_model_dir(tmp_path_factory.mktemp("rand"))


def _problems(n_good=10):
    rows = [{"id": f"p{i}", "prompt": f"problem {i}:"} for i in range(n_good)]
    rows[3]["n"] = 2
    rows[5] = {"id": "p5", "messages": [{"role": "user", "content": "chat line"}], "method": "plain"}
    rows.insert(2, "{this is not json")
    rows.insert(4, {"id": "p1", "prompt": "a duplicate id"})
    rows.insert(6, {"id": "bad-alpha", "prompt": "x", "alpha": -1})
    rows.insert(7, {"prompt": "no id"})
    rows.insert(8, "")  # blank lines are skipped
    rows.append({"id": "too-long", "prompt": "z" * 240})  # 240 + 24 > context 256
    return rows


def test_good_malformed_and_duplicate_lines(random_model, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", _problems())
    out = tmp_path / "out.jsonl"
    assert run("--model", random_model, "--input", inp, "--output", out, "--seed", "3", *MH) == 0
    recs = records(out)
    by_line = {r["line"]: r for r in recs}
    assert [r["line"] for r in recs] == sorted(by_line) and 9 not in by_line  # input order; blank line skipped
    assert "not valid JSON" in by_line[3]["error"]
    assert by_line[5]["error"] == "line 5 (id 'p1'): duplicate id (first on line 2)"
    assert "alpha must be a finite number > 0" in by_line[7]["error"] and by_line[7]["id"] == "bad-alpha"
    assert "needs an \"id\"" in by_line[8]["error"]
    assert "context" in by_line[max(by_line)]["error"] and by_line[max(by_line)]["id"] == "too-long"
    good = [r for r in recs if "error" not in r]
    assert [r["id"] for r in good] == [f"p{i}" for i in range(10)]
    for r in good:
        assert len(r["samples"]) == r["params"]["n"] and r["params"]["seed"] == 3
        for s in r["samples"]:
            assert len(s["token_ids"]) == 24 and len(s["text"]) == 24  # no EOS in this model
            assert s["stats"]["tokens_sampled"] >= 24
    assert [len(r["samples"]) for r in good][3] == 2
    assert {r["params"]["method"] for r in good} == {"mh", "plain"}
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["ok"] == 10 and summary["errors"] == 5 and summary["tokens_per_s"] > 0
    # an existing output is not overwritten without --resume
    assert run("--model", random_model, "--input", inp, "--output", out, *MH) == 2


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_file(random_model, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", _problems(16))
    ref = tmp_path / "ref.jsonl"
    assert run("--model", random_model, "--input", inp, "--output", ref, *MH) == 0
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(cli_command() + ["run", "--model", str(random_model), "--input", str(inp),
                                             "--output", str(out), *MH],
                            env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out.exists() and out.read_text().count("\n") >= 6):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    n_done = out.read_text().count("\n")
    assert n_done < len(records(ref)), "the run finished before it could be killed"
    with open(out, "a") as f:  # a record cut short by the crash
        f.write('{"line": 12, "id": "p8", "par')
    assert run("--model", random_model, "--input", inp, "--output", out, "--resume", *MH) == 0
    assert records(out) == records(ref)
    # resuming a finished run changes nothing
    assert run("--model", random_model, "--input", inp, "--output", out, "--resume", *MH) == 0
    assert records(out) == records(ref)


PROBLEMS = [  # the oracle model always answers \boxed{0.5}
    ({"id": "frac", "prompt": "What is 1/2 as a decimal?", "answer": "\\frac{1}{2}"}, True),
    ({"id": "slash", "prompt": "Half of one?", "answer": "1/2"}, True),
    ({"id": "equiv", "prompt": "Simplify 2/4:", "answer": "\\dfrac{2}{4}"}, True),
    ({"id": "boxed", "messages": [{"role": "user", "content": "1 - 0.5?"}], "answer": "\\boxed{\\frac12}"}, True),
    ({"id": "percent", "prompt": "50 percent as a number?", "answer": "50\\%"}, True),
    ({"id": "wrong", "prompt": "What is 1/4?", "answer": "0.25"}, False),
    ({"id": "wrong-int", "prompt": "2 + 3?", "answer": "5"}, False),
    ({"id": "no-answer", "prompt": "Say hi:"}, None),
]


def test_grade_math_end_to_end(tmp_path_factory, tmp_path):
    pytest.importorskip("math_verify")
    model = make_oracle_model_dir(tmp_path_factory.mktemp("oracle"))
    rows = [dict(p, n=2) if p["id"] == "frac" else p for p, _ in PROBLEMS]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert run("--model", model, "--input", inp, "--output", out, "--grade", "math", "--max-new-tokens", "16",
               "--block-size", "8", "--steps", "2", "--no-progress") == 0
    recs = {r["id"]: r for r in records(out)}
    for p, want in PROBLEMS:
        r = recs[p["id"]]
        assert all(s["text"] == "\\boxed{0.5}" for s in r["samples"])
        if want is None:
            assert "num_correct" not in r and "correct" not in r["samples"][0]
        else:
            assert [s["correct"] for s in r["samples"]] == [want] * len(r["samples"]), p
            assert r["num_correct"] == (len(r["samples"]) if want else 0)
            assert r["samples"][0]["extracted"] is not None
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["graded"] == 7 and summary["accuracy"] == pytest.approx(5 / 7)
    assert "pass@2" not in summary  # one graded line has a single sample


@pytest.mark.parametrize("text,answer,correct", [
    ("so the answer is \\boxed{\\frac{3}{4}}", "0.75", True),
    ("\\boxed{0.75}", "\\frac{3}{4}", True),
    ("We get $\\frac{6}{8}$, i.e. \\boxed{\\frac{6}{8}}", "3/4", True),
    ("Thus \\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("Expanding: \\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{\\pi/2}", "\\frac{\\pi}{2}", True),
    ("First 3 apples, then 4 more: 7.", "7", True),
    ("\\boxed{7}", "8", False),
    ("\\boxed{\\frac{1}{3}}", "0.33", False),
    ("I do not know.", "5", False),
])
def test_grade_math_hand_written(text, answer, correct):
    pytest.importorskip("math_verify")
    from powersample_fast.entrypoints.batch.grading import grade_math

    extracted, ok = grade_math(text, answer)
    assert ok is correct and (extracted is not None or not correct)


def test_pass_at_k():
    from powersample_fast.entrypoints.batch.grading import pass_at_k

    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25) and pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)


@pytest.mark.parametrize("flag", ["--threads", "--max-batch", "--max-len"])
def test_engine_flags_checked_before_loading(random_model, tmp_path, capsys, flag):
    """`run` shares sample's engine flags (cli_setup.add_engine_args) and their checks."""
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}])
    assert run("--model", random_model, "--input", inp, "--output", tmp_path / "out.jsonl", flag, 0) == 2
    assert f"{flag} must be an integer >= 1 (got 0)" in capsys.readouterr().err


def test_chat_template_default_matches_sample(random_model, tmp_path):
    """String prompts get the chat template by default (as `sample` does) and not with --no-chat;
    token-id prompts never do; "messages" lines always do."""
    from powersample_fast.models.tokenizer import load_tokenizer
    from powersample_fast.prompts import normalize_prompts

    tok = load_tokenizer(random_model)
    rows = [{"id": "s", "prompt": "two plus two", "method": "plain"},
            {"id": "ids", "prompt": [5, 6, 7], "method": "plain"},
            {"id": "m", "messages": [{"role": "user", "content": "two plus two"}], "method": "plain"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    templated = len(normalize_prompts("two plus two", tok, chat=True)[0])
    raw = len(normalize_prompts("two plus two", tok, chat=False)[0])
    assert templated > raw
    got = {}
    for flag in (None, "--chat", "--no-chat"):
        out = tmp_path / f"out{flag}.jsonl"
        assert run("--model", random_model, "--input", inp, "--output", out, *MH, *([flag] if flag else [])) == 0
        got[flag] = {r["id"]: r["prompt_tokens"] for r in records(out)}
    assert got[None] == got["--chat"] == {"s": templated, "ids": 3, "m": templated}
    assert got["--no-chat"] == {"s": raw, "ids": 3, "m": templated}
