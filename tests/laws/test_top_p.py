"""top_p (nucleus) for method "plain": the threshold of nucleus.py fed to the fused sampling kernel.

Exact law on the default enumerable toy (its laws: tests/helpers/laws.py): sequential sampling from
the nucleus of softmax(z / tau) at every position, the nucleus computed independently with transformers'
TopPLogitsWarper in fp64. Many plain samples match it (chi-square), the law without top_p is
rejected, and the Triton kernel path (interpreted on CPU) draws the same tokens as the torch path.
"""
import math

import numpy as np
import pytest
import torch

import powersample_fast as pf
from powersample_fast.sampling_params import SamplingParams
from powersample_fast import ops
from powersample_fast.errors import ConfigError
from powersample_fast.ops.nucleus import topp_threshold
from helpers.laws import chi_square_pvalue, counts_of, toy_tree, tv

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PROMPT, T, EOS, TAU, TOP_P = [0, 1], 4, 3, 0.8, 0.75


def _nucleus_logprobs(z: torch.Tensor, tau: float, top_p: float) -> torch.Tensor:
    from transformers.generation.logits_process import TopPLogitsWarper

    w = TopPLogitsWarper(top_p=top_p)
    return torch.log_softmax(w(None, (z.double() / tau)[None])[0], -1)


def _law(tree, tau, top_p):
    law = {}
    for s in tree.states():
        lp = sum(float(_nucleus_logprobs(tree.logits[s[:i]], tau, top_p)[s[i]]) if top_p else
                 float(torch.log_softmax(tree.logits[s[:i]] / tau, -1)[s[i]]) for i in range(len(s)))
        if lp > -math.inf:
            law[s] = math.exp(lp)
    return law


@pytest.fixture(scope="module")
def laws(toy_dir):
    tree = toy_tree(toy_dir, PROMPT, T, EOS)
    # the fixture's nucleus boundaries are far from TOP_P (no position decided by rounding), and it cuts
    for z in tree.logits.values():
        p = np.sort(torch.softmax(z / TAU, -1).numpy())[::-1]
        assert np.min(np.abs(np.cumsum(p) - TOP_P)) > 0.01
    law, full = _law(tree, TAU, TOP_P), _law(tree, TAU, None)
    assert len(law) < len(full) and tv(law, full) > 0.1
    return law, full


def test_threshold_rule_matches_hf_warper():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 50, generator=g) * 2
    for top_p in (0.05, 0.5, 0.9, 0.999):
        thr = topp_threshold(z, 1 / 0.7, top_p)
        ref = torch.isfinite(torch.stack([_nucleus_logprobs(r, 0.7, top_p) for r in z]))
        assert torch.equal(z >= thr[:, None], ref), top_p
    # after top-k: the nucleus of the top-k renormalised distribution
    k_thr = ops.topk_threshold(z, 5)
    both = topp_threshold(z, 1.0, 0.9, k_thr)
    assert bool((both >= k_thr).all()) and int((z >= both[:, None]).sum(-1).max()) <= 5
    assert topp_threshold(z, 1.0, None) is None and topp_threshold(z, 1.0, 1.0, k_thr) is k_thr


def test_plain_top_p_law_is_exact(toy_dir, laws):
    law, full = laws
    model, _ = pf.load(toy_dir, device="cpu", dtype="float32")
    s = pf.PowerSampler(model)
    n = 3000
    res = s.generate(PROMPT, method="plain", proposal_temperature=TAU, top_p=TOP_P, max_new_tokens=T, n=n, seed=4,
                     progress=False, max_batch=256)
    counts = counts_of(r.token_ids for r in res)
    assert set(counts) <= set(law)  # never a token outside a nucleus
    assert chi_square_pvalue(counts, law) > 1e-3
    assert chi_square_pvalue(counts, full) < 1e-6  # the wrong variant (no nucleus) is rejected


def test_kernel_path_draws_the_same_tokens(toy_dir, monkeypatch):
    model, _ = pf.load(toy_dir, device="cpu", dtype="float32")
    s = pf.PowerSampler(model)
    kw = dict(method="plain", proposal_temperature=TAU, top_p=TOP_P, max_new_tokens=T, n=40, seed=9, progress=False)
    torch_path = [r.token_ids for r in s.generate(PROMPT, **kw)]
    monkeypatch.setenv("POWERSAMPLE_FAST_BACKEND", "triton")
    assert [r.token_ids for r in s.generate(PROMPT, **kw)] == torch_path


def test_top_p_is_refused_by_the_power_samplers_and_checked():
    for m in ("mh", "smc", "sps", "sps_token"):
        with pytest.raises(ConfigError, match="top_p applies to method 'plain' only"):
            SamplingParams(method=m, top_p=0.9)
    assert SamplingParams(method="mh", top_p=1.0).top_p is None  # neutral
    for bad in (0, 1.5, -0.1, True, "0.5"):
        with pytest.raises(ConfigError, match="top_p must be"):
            SamplingParams(method="plain", top_p=bad)
