"""The MH mixing parameters (issue 22: index="entropy", mh_tries, entropy_eps, entropy_beta) through
every entry point: the `sample` CLI, `run` lines and flags, the server's extra body fields (the
request parser the server uses), and the paper drop-in; bad values give the SamplingParams messages.
The flags themselves come from the one sampling-flag table (entrypoints/cli/sampling_flags.py)."""
import json

import pytest
import torch

from powersample_fast.entrypoints.cli import main as cli
from powersample_fast.entrypoints.cli.sampling_flags import sampling_args
from powersample_fast.errors import ConfigError
from powersample_fast.sampling_params import SamplingParams
from helpers.tiny_models import make_random_model_dir

pytestmark = pytest.mark.usefixtures("one_thread")

MIX = dict(index="entropy", mh_tries=2, entropy_eps=0.2, entropy_beta=1.5)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    return make_random_model_dir(tmp_path_factory.mktemp("rand"))


def test_work_limits_count_the_rows_and_tokens_of_the_options():
    """work_limits' closed forms (memory and planned-token checks, progress plan) equal the policy's
    rows and planned tokens with the options; the start line's decode steps count the 2k - 1 rows of
    a step as decoded in parallel."""
    import itertools

    from powersample_fast.engine.policies import get_policy
    from powersample_fast.entrypoints import work_limits
    from powersample_fast.entrypoints.cli.output import expected_decode_steps

    for T, B, N, idx, k in itertools.product([1, 7, 64], [1, 3, 64], [0, 1, 10], ["uniform", "last_block", "entropy"],
                                             [1, 2, 4]):
        p = SamplingParams(max_new_tokens=T, block_size=B, mcmc_steps=N, index=idx, mh_tries=k)
        assert work_limits.planned_tokens_per_chain(p) == pytest.approx(get_policy("mh").planned_tokens(p))
        assert work_limits.decode_rows(p) == get_policy("mh").rows(p)[0] == 2 * k - 1
    one, three = SamplingParams(max_new_tokens=64, block_size=16), SamplingParams(max_new_tokens=64, block_size=16,
                                                                                  mh_tries=3)
    assert expected_decode_steps(three, 4, 20) == expected_decode_steps(one, 4, 4)


def test_sample_cli_flags_reach_generate(random_model, monkeypatch):
    from powersample_fast import api

    seen = {}
    monkeypatch.setattr(api.PowerSampler, "generate", lambda self, prompts, **kw: seen.update(kw) or [])
    rc = cli.main(["sample", "--model", str(random_model), "--prompt", "a", "--max-new-tokens", "8", "--no-progress",
                   "--index", "entropy", "--mh-tries", "2", "--entropy-eps", "0.2", "--entropy-beta", "1.5"])
    assert rc == 0 and {k: seen[k] for k in MIX} == MIX


def test_sample_cli_runs_and_names_bad_values(random_model, capsys):
    base = ["sample", "--model", str(random_model), "--prompt", "abc", "--max-new-tokens", "8", "--block-size", "4",
            "--steps", "2", "--seed", "0", "--no-progress", "--json", "--no-chat"]
    assert cli.main(base + ["--index", "entropy", "--mh-tries", "2"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert (row["index"], row["mh_tries"], row["entropy_eps"]) == ("entropy", 2, 0.1)
    assert row["proposed"] == 2 * 2 and 1 <= len(row["token_ids"]) <= 8
    for args, match in [(["--mh-tries", "0"], "mh_tries"), (["--entropy-eps", "-1"], "entropy_eps must be"),
                        (["--mh-tries", "2", "--method", "plain"], "applies to method 'mh' only")]:
        assert cli.main(base + args) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err


def test_run_lines_and_flags(random_model, tmp_path):
    from powersample_fast.entrypoints.batch.input_lines import parse_line

    job = parse_line(1, json.dumps({"id": "a", "prompt": [1, 2, 3], **MIX}), {}, None, None, SamplingParams)
    assert {k: getattr(job.params, k) for k in MIX} == MIX
    bad = parse_line(2, json.dumps({"id": "b", "prompt": [1], "entropy_beta": 0}), {}, None, None, SamplingParams)
    assert "entropy_beta must be a number > 0" in bad["error"]
    args = cli._parser().parse_args(["run", "--model", "m", "--input", "i", "--output", "o", "--index", "entropy",
                                     "--mh-tries", "3", "--entropy-eps", "0.5", "--entropy-beta", "2"])
    defaults = sampling_args(args)
    assert {k: defaults[k] for k in MIX} == dict(index="entropy", mh_tries=3, entropy_eps=0.5, entropy_beta=2.0)
    # end to end: one line with the options, on the engine
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "x", "prompt": "problem:", **MIX}) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli.main(["run", "--model", str(random_model), "--input", str(inp), "--output", str(out),
                     "--max-new-tokens", "8", "--block-size", "4", "--steps", "2", "--no-progress"]) == 0
    rec = json.loads(out.read_text().splitlines()[0])
    assert {k: rec["params"][k] for k in MIX} == MIX and rec["samples"][0]["proposed"] == 4


def test_server_extra_body_fields():
    from powersample_fast.entrypoints.openai.protocol import parse_request

    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 8, **MIX}
    parsed = parse_request(body, chat=False, tokenizer=None, context=64, param_cls=SamplingParams)
    assert {k: getattr(parsed.params, k) for k in MIX} == MIX
    with pytest.raises(ConfigError, match="mh_tries .* must be an integer >= 1"):
        parse_request(dict(body, mh_tries=0), chat=False, tokenizer=None, context=64, param_cls=SamplingParams)
    with pytest.raises(ConfigError, match="did you mean 'mh_tries'"):
        parse_request({"model": "m", "prompt": [1], "mh_trie": 2}, chat=False, tokenizer=None, context=64,
                      param_cls=SamplingParams)


def test_paper_drop_in_takes_the_options(random_model):
    from types import SimpleNamespace

    import powersample_fast as pf
    from powersample_fast.entrypoints.paper import mcmc_power_samp

    model, _ = pf.load(random_model, device="cpu", dtype=torch.float32)
    p = SimpleNamespace(model=model, tokenizer=None)
    gen, lq, target, ratio = mcmc_power_samp(p, [1, 2, 3], 0.25, 2, 8, block_num=2, seed=0, **MIX)
    assert len(gen) - 3 == len(lq) == len(target) and 0.0 <= ratio <= 1.0
    with pytest.raises(ConfigError, match="entropy_eps must be"):
        mcmc_power_samp(p, [1, 2, 3], 0.25, 2, 8, block_num=2, entropy_eps=0)
