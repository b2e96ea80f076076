"""The one table of sampling flags: a command-line flag for every `SamplingParams` field, named after
the field (two keep a short name too: --steps, --temperature), its default the field's. `sample` and
`run` add the same table; the server takes the same fields, by name, as request body fields."""
from __future__ import annotations

import argparse
import dataclasses

from ...sampling_params import INDEX_MODES, METHODS, SamplingParams

SHORT_NAMES = {"mcmc_steps": "--steps", "proposal_temperature": "--temperature"}
CHOICES = {"method": METHODS, "index": INDEX_MODES}
HELP = {  # a field missing here still gets its flag (help: the field's name)
    "method": "mh: Algorithm 1 (exact power sampling); smc: Power-SMC; sps: Scalable Power Sampling, block "
              "level; sps_token: its token-level variant; plain: ancestral sampling",
    "alpha": "power alpha: the target is p^alpha",
    "max_new_tokens": "token budget T",
    "block_size": "mh and sps: block size B",
    "mcmc_steps": "mh: MH steps per block",
    "proposal_temperature": "proposal temperature (default: 1/alpha; plain: the sampling temperature, default 1)",
    "top_k": "restrict proposals to the top-k tokens (default: off)",
    "index": "mh: cut-index mode (entropy: cut where the next-token entropy is high; exact)",
    "n": "samples per prompt (run: per line)",
    "seed": "base seed; chains are keyed by (seed, prompt or line id, sample) (default: sample draws one and "
            "prints it with --json; run uses 0, so a rerun or --resume gives the same records)",
    "early_stop": "mh: stop a chain whose state ends with EOS before the last stage (the paper's rule: "
                  "cheaper, not exact)",
    "particles": "smc: particles N per sample",
    "ess_threshold": "smc: resample when ESS < this * N",
    "resample_every": "smc: ESS check every this many tokens",
    "alpha_ramp_tokens": "smc: ramp the exponent 1 -> alpha over this many tokens (0: off)",
    "return_all": "smc: all particles and their weights in the results",
    "sps_top_k": "sps: candidates K with rollouts, per block (sps_token: per token)",
    "sps_rollouts": "sps: rollouts M per candidate",
    "sps_horizon": "sps: rollout length H",
    "sps_candidates": "sps (block level): candidate blocks L sampled per block",
    "top_p": "plain: nucleus sampling, keep the smallest set of tokens with this much mass (default: off)",
    "stop": "stop strings: plain stops at one, the samplers treat one like EOS (docs/ALGORITHM.md) (default: none)",
    "logprobs": "N: each token's base-model log-prob and the N most likely tokens' in the results (default: off)",
    "prompt_logprobs": "N: the prompt's log-probs likewise, from its prefill (default: off)",
    "mh_tries": "mh: k proposals per MH step, multiple-try Metropolis on 2k-1 rows decoded together "
                "(1: Algorithm 1)",
    "entropy_eps": "mh, --index entropy: cut weight g(h) = eps + h**beta, its eps",
    "entropy_beta": "mh, --index entropy: beta of the cut weight g(h)",
}


def _type(f: dataclasses.Field):
    t = str(f.type)
    return float if "float" in t else int if "int" in t else str


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """One flag per SamplingParams field (dest: the field's name), in one argument group."""
    g = parser.add_argument_group("sampling parameters",
                                  "one flag per SamplingParams field, with its default (the papers')")
    for f in dataclasses.fields(SamplingParams):
        names = ([SHORT_NAMES[f.name]] if f.name in SHORT_NAMES else []) + ["--" + f.name.replace("_", "-")]
        text = HELP.get(f.name, f.name.replace("_", " "))
        if isinstance(f.default, bool):
            action = "store_true" if f.default is False else argparse.BooleanOptionalAction
            g.add_argument(*names, dest=f.name, action=action, default=f.default, help=text)
        else:
            text += "" if "default" in text else " (default %(default)s)"
            many = {"nargs": "+"} if isinstance(f.default, tuple) else {}  # stop: one or more strings
            g.add_argument(*names, dest=f.name, type=_type(f), default=f.default, choices=CHOICES.get(f.name),
                           help=text, **many)


def sampling_args(args: argparse.Namespace) -> dict:
    """The SamplingParams fields from parsed flags (every field: the table has one flag per field)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingParams)}
