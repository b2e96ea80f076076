"""The one table of sampling flags (entrypoints/cli/sampling_flags.py): `sample` and `run` offer the
same flag for every SamplingParams field, with the same names, defaults and help, and the server
takes every field as a body field."""
import argparse
import dataclasses

from powersample_fast.entrypoints.cli import main as cli
from powersample_fast.entrypoints.cli.sampling_flags import sampling_args
from powersample_fast.entrypoints.openai.protocol import parse_request
from powersample_fast.sampling_params import SamplingParams

FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]


def _subparsers():
    ap = cli._parser()
    sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _flags(parser):
    return {a.dest: (tuple(a.option_strings), a.default, a.type, a.choices, a.help, type(a).__name__)
            for a in parser._actions if a.dest in FIELDS}


def _section(parser, title="sampling parameters:"):
    text = parser.format_help()
    return text[text.index(title):].split("\n\n", 2)[:2]


def test_sample_and_run_share_every_sampling_flag():
    subs = _subparsers()
    sample, run = _flags(subs["sample"]), _flags(subs["run"])
    assert sorted(sample) == sorted(FIELDS)  # every field, every method's parameters
    assert sample == run  # same names, defaults, types, choices and help
    for f in dataclasses.fields(SamplingParams):
        assert sample[f.name][1] == f.default  # defaults: SamplingParams'
        assert "--" + f.name.replace("_", "-") in sample[f.name][0]  # the field's own name is a flag
    assert _section(subs["sample"]) == _section(subs["run"])  # `sample --help` and `run --help` agree


def test_flags_build_the_params_of_each_command():
    ap = cli._parser()
    args = ap.parse_args(["sample", "--prompt", "x", "--steps", "3", "--temperature", "0.5", "--method", "smc",
                          "--particles", "5", "--return-all", "--early-stop"])
    p = SamplingParams(**sampling_args(args))
    assert (p.mcmc_steps, p.proposal_temperature, p.method, p.particles, p.return_all, p.early_stop) == \
        (3, 0.5, "smc", 5, True, True)
    args = ap.parse_args(["sample", "--prompt", "x", "--method", "plain", "--top-p", "0.9", "--stop", "ab", "\n",
                          "--logprobs", "2", "--prompt-logprobs", "0"])
    p = SamplingParams(**sampling_args(args))
    assert (p.top_p, p.stop, p.logprobs, p.prompt_logprobs) == (0.9, ("ab", "\n"), 2, 0)
    run = ap.parse_args(["run", "--input", "i", "--output", "o"])
    assert SamplingParams(**sampling_args(run)) == SamplingParams()  # run's defaults: SamplingParams'


def test_server_takes_every_field_as_a_body_field():
    want = SamplingParams(method="sps", alpha=2.0, max_new_tokens=7, block_size=3, mcmc_steps=2,
                          proposal_temperature=0.9, index="last_block", n=2, seed=5, early_stop=True, particles=3,
                          ess_threshold=0.7, resample_every=2, alpha_ramp_tokens=1, return_all=True, sps_top_k=2,
                          sps_rollouts=3, sps_horizon=4, sps_candidates=5, stop=("ab",), logprobs=2, prompt_logprobs=2)
    body = {"prompt": [1, 2, 3], **{k: list(v) if isinstance(v, tuple) else v
                                    for k, v in dataclasses.asdict(want).items() if v is not None}}
    # prompt_logprobs is spelled OpenAI's way: echo with logprobs N
    body["echo"] = body.pop("prompt_logprobs") == body["logprobs"]
    # top_k and top_p do not apply to sps (top_p: below)
    assert set(body) - {"prompt"} >= set(FIELDS) - {"top_k", "top_p", "prompt_logprobs"}
    got = parse_request(body, chat=False, tokenizer=None, context=100, param_cls=SamplingParams)
    assert got.params == want
    plain = parse_request({"prompt": [1, 2], "method": "plain", "top_p": 0.5, "top_k": 3}, chat=False,
                          tokenizer=None, context=100, param_cls=SamplingParams)
    assert (plain.params.top_p, plain.params.top_k) == (0.5, 3)
