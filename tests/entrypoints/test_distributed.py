"""`powersample-fast run` under `torchrun --nproc-per-node 2` (gloo, CPU): the same records as one
process, merged into one output in input order, part files removed."""
import json
import subprocess

import pytest

from powersample_fast.entrypoints.cli import main as cli
from powersample_fast.entrypoints.batch.distributed import DistInfo
from test_batch_run import records
from helpers.tiny_models import cli_command, make_random_model_dir, subprocess_env

ARGS = ["--max-new-tokens", "16", "--block-size", "8", "--steps", "2", "--max-batch", "4", "--no-progress", "--seed", "7"]


def test_shards_cover_every_line_once():
    owners = [[r for r in range(3) if DistInfo(r, 3).owns(line)] for line in range(1, 11)]
    assert all(len(o) == 1 for o in owners) and [o[0] for o in owners] == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tmp_path):
    model = make_random_model_dir(tmp_path / "model")
    rows = [{"id": f"q{i}", "prompt": f"question {i}?"} for i in range(7)]
    rows[2]["n"] = 2
    rows.insert(4, "not json")
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    one = tmp_path / "one.jsonl"
    assert cli.main(["run", "--model", str(model), "--input", str(inp), "--output", str(one), *ARGS]) == 0
    two = tmp_path / "two.jsonl"
    cmd = cli_command()
    proc = subprocess.run(
        [cmd[0], "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *cmd[1:],  # -m powersample_fast.cli
         "run", "--model", str(model), "--input", str(inp), "--output", str(two), *ARGS],
        env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert records(two) == records(one)
    assert [r["line"] for r in records(two)] == list(range(1, 9))
    assert not list(tmp_path.glob("two.jsonl.part-*"))
    assert "summary: lines=8, ok=7, errors=1" in proc.stderr
