"""CLI: sampling a prompt end to end (text and JSON output), profiling trace, stats, errors."""
import dataclasses
import json

import pytest
import torch

from powersample_fast.entrypoints.cli import main as cli
from powersample_fast import ops
from powersample_fast.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Tiny random Llama + a real tokenizer built offline from a small vocab (helpers.tiny_models)."""
    from helpers.tiny_models import make_cli_model_dir

    return make_cli_model_dir(tmp_path_factory.mktemp("cli_model"))


def test_sample_text_and_json(model_dir, capsys):
    rc = cli.main(["sample", "--model", str(model_dir), "--prompt", "hello world", "--prompt", "abc",
                   "--max-new-tokens", "12", "--block-size", "4", "--steps", "2", "--n", "2", "--seed", "0",
                   "--json", "--no-progress", "--stats", "--chat"])
    assert rc == 0
    out, err = capsys.readouterr()
    *rows, last = [json.loads(line) for line in out.strip().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rows:
        assert 1 <= len(r["token_ids"]) <= 12 and len(r["logp"]) == len(r["token_ids"])
        assert set(r["text"]) <= set("abcdefghijklmnopqrstuvwxyz ")
    # with --json the stats are the last stdout line, one JSON object
    assert set(last) == {"stats"} and {"acceptance_rate", "decode_s", "wall_s"} <= set(last["stats"])
    assert "acceptance_rate=" not in err
    rc = cli.main(["sample", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "6",
                   "--block-size", "3", "--steps", "1", "--seed", "0", "--no-progress"])
    out, _ = capsys.readouterr()
    assert rc == 0 and out.startswith("--- prompt 0 sample 0:")


def test_profile_trace(model_dir, tmp_path, capsys):
    trace = tmp_path / "trace.json"
    rc = cli.main(["sample", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "6",
                   "--block-size", "3", "--steps", "1", "--seed", "0", "--no-progress", "--profile", str(trace)])
    assert rc == 0
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert {"prefill", "decode", "sample", "accept"} <= names


@pytest.mark.parametrize("args,match", [
    (["--alpha", "0"], "alpha must be"),
    (["--model", "/nonexistent/dir"], "does not exist"),
    (["--top-k", "0"], "top_k"),
    (["--device", "tpu"], "device"),
    (["--dtype", "int4"], "unsupported dtype"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")]))
def test_errors_are_one_line(model_dir, capsys, args, match):
    base = ["sample", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4", "--no-progress"]
    rc = cli.main(base + args)
    err = capsys.readouterr().err
    assert rc == 2 and match in err and "Traceback" not in err


def test_flags_reach_generate(model_dir, monkeypatch, capsys):
    """Every sampling flag is passed through to PowerSampler.generate / the constructor."""
    from powersample_fast import api as smod

    seen = {}

    def fake_generate(self, prompts, **kw):
        seen.update(kw, prompts=prompts, cuda_graphs=self.cuda_graphs)
        return []

    monkeypatch.setattr(smod.PowerSampler, "generate", fake_generate)
    rc = cli.main(["sample", "--model", str(model_dir), "--prompt", "a", "--prompt", "b", "--alpha", "2.5",
                   "--steps", "7", "--block-size", "33", "--max-new-tokens", "99", "--temperature", "0.7",
                   "--n", "3", "--seed", "5", "--top-k", "4", "--index", "last_block", "--max-batch", "6",
                   "--cuda-graphs", "--no-progress", "--chat", "--backend", "torch"])
    ops.set_backend("auto")  # --backend sets a process-wide choice
    assert rc == 0
    p = SamplingParams(alpha=2.5, mcmc_steps=7, block_size=33, max_new_tokens=99, proposal_temperature=0.7, n=3,
                       seed=5, top_k=4, index="last_block")
    assert seen == dict(prompts=["a", "b"], **dataclasses.asdict(p), max_batch=6, chat=True, progress=False,
                        cuda_graphs=True)


def test_ctrl_c_exits_cleanly(model_dir, monkeypatch, capsys):
    from powersample_fast import api as smod

    def interrupted(self, prompts, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(smod.PowerSampler, "generate", interrupted)
    rc = cli.main(["sample", "--model", str(model_dir), "--prompt", "a", "--max-new-tokens", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 130 and err.splitlines()[-1] == "powersample-fast: interrupted" and "Traceback" not in err


def test_nvtx_and_profile_are_exclusive(model_dir, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["sample", "--model", str(model_dir), "--prompt", "a", "--nvtx", "--profile", str(tmp_path / "t.json")])


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_is_noted(model_dir, capsys, monkeypatch, native):
    from powersample_fast import device as D

    monkeypatch.setattr(D, "cpu_has_native_bf16", lambda: native)
    args = ["sample", "--model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4", "--block-size", "2",
            "--steps", "1", "--seed", "0", "--no-progress", "--device", "cpu"]
    assert cli.main(args + ["--dtype", "bfloat16"]) == 0
    err = capsys.readouterr().err
    assert ("no native bf16 matrix instructions" in err and "--dtype float32" in err) is (not native)
    assert cli.main(args + ["--dtype", "float32"]) == 0
    assert "native bf16" not in capsys.readouterr().err
    assert D.slow_dtype_note("cuda", torch.bfloat16) is None
