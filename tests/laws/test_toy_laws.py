"""Sanity of the exact-law utilities in helpers/laws.py (the yardsticks of the sampler tests)."""
import math

import numpy as np
import pytest
import torch

from helpers.laws import (
    _mh_matrix,
    chi_square_pvalue,
    enumerate_states,
    exact_power_law,
    hf_next_logits_fn,
    load_toy_model,
    low_temperature_law,
    mh_chain_law,
    proposal_law,
    sample_law,
    toy_tree,
    tv,
    tv_noise_reference,
)

from helpers.laws import EOS, PROMPT, T  # noqa: E402

pytestmark = pytest.mark.slow


def _base_law(states):
    return {s: math.exp(sum(torch.log_softmax(z[i], -1)[s[i]].item() for i in range(len(s)))) for s, z in states.items()}


def test_model_dir_layout(toy_dir):
    assert (toy_dir / "config.json").is_file() and (toy_dir / "model.safetensors").is_file()
    m = load_toy_model(toy_dir)
    assert m.config.vocab_size == 4 and m.config.eos_token_id == EOS and not m.config.tie_word_embeddings


def test_enumeration(toy_dir):
    fn = hf_next_logits_fn(toy_dir)
    states = enumerate_states(fn, PROMPT, T, EOS)
    assert len(states) == 3**4 + 1 + 3 + 9 + 27
    for s, z in states.items():
        assert EOS not in s[:-1] and (len(s) == T or s[-1] == EOS)
        assert z.shape == (len(s), 4)
    # the tree's per-prefix logits equal one full forward of prompt + state (fp32 model)
    m = load_toy_model(toy_dir)
    for s in [(0, 1, 0, 1), (2, 2, 0, 3), (1, 3)]:
        with torch.no_grad():
            full = m(torch.tensor([PROMPT + list(s)])).logits[0, len(PROMPT) - 1 : -1].double()
        torch.testing.assert_close(states[s], full, atol=1e-5, rtol=1e-5)


def test_laws_normalised_and_consistent(toy_dir):
    states = enumerate_states(hf_next_logits_fn(toy_dir), PROMPT, T, EOS)
    base = _base_law(states)
    assert sum(base.values()) == pytest.approx(1.0, abs=1e-9)
    laws = {
        "power": exact_power_law(toy_dir, PROMPT, 4.0, T, EOS),
        "low_temp": low_temperature_law(toy_dir, PROMPT, 4.0, T, EOS),
        "prop_top2": proposal_law(toy_dir, PROMPT, 0.5, T, EOS, top_k=2),
        "power_top2": exact_power_law(toy_dir, PROMPT, 4.0, T, EOS, top_k=2),
        "chain": mh_chain_law(toy_dir, PROMPT, alpha=4.0, max_new_tokens=T, block_size=2, mcmc_steps=3, eos_id=EOS),
    }
    for name, law in laws.items():
        assert sum(law.values()) == pytest.approx(1.0, abs=1e-9), name
    assert len(laws["prop_top2"]) < len(base)  # top-k truncation removes states
    assert set(laws["prop_top2"]) == set(laws["power_top2"])
    assert tv(proposal_law(toy_dir, PROMPT, 1.0, T, EOS), base) < 1e-12
    assert tv(exact_power_law(toy_dir, PROMPT, 1.0, T, EOS), base) < 1e-12
    # mcmc_steps = 0: the chain's output is the proposal chain
    chain0 = mh_chain_law(toy_dir, PROMPT, alpha=4.0, max_new_tokens=T, block_size=2, mcmc_steps=0, eos_id=EOS)
    assert tv(chain0, laws["low_temp"]) < 1e-12


def test_power_law_is_not_low_temperature(toy_dir):
    power = exact_power_law(toy_dir, PROMPT, 4.0, T, EOS)
    low = low_temperature_law(toy_dir, PROMPT, 4.0, T, EOS)
    assert tv(power, low) > 0.15  # 0.25 for the default toy model
    # the toy is neither uniform nor near-deterministic
    probs = torch.softmax(torch.stack(list(toy_tree(toy_dir, PROMPT, T, EOS).logits.values())), -1)
    assert 0.3 < probs.max(-1).values.min() and probs.max() < 0.95


@pytest.mark.parametrize("index", ["uniform", "last_block"])
@pytest.mark.parametrize("tau", [1.0, 0.25])
def test_mh_kernel_preserves_stage_target(toy_dir, index, tau):
    """One MH step leaves pi_K invariant (uniform mode; last_block given the frozen first block):
    checks the acceptance formula, the index term included, independently of any sampler."""
    tree = toy_tree(toy_dir, PROMPT, T, EOS)
    states = tree.states(T)
    lp = [tree.token_logprobs(s) for s in states]
    lq = [tree.token_logprobs(s, tau) for s in states]
    base = 2 if index == "last_block" else 0
    P = _mh_matrix(states, {s: i for i, s in enumerate(states)}, lp, lq, 4.0, base)
    np.testing.assert_allclose(P.sum(1), 1.0, atol=1e-12)
    w = np.exp(4.0 * np.array([x.sum() for x in lp]))
    if index == "last_block":  # invariant conditionally on each frozen first block
        for prefix in {s[:2] for s in states if len(s) > 2}:
            idx = [i for i, s in enumerate(states) if len(s) > 2 and s[:2] == prefix]
            pi = np.zeros(len(states))
            pi[idx] = w[idx] / w[idx].sum()
            np.testing.assert_allclose(pi @ P, pi, atol=1e-12)
    else:
        pi = w / w.sum()
        np.testing.assert_allclose(pi @ P, pi, atol=1e-12)


def test_noise_yardsticks(toy_dir):
    rng = np.random.default_rng(0)
    law = exact_power_law(toy_dir, PROMPT, 4.0, T, EOS)
    n1, n4 = tv_noise_reference(law, 400, rng), tv_noise_reference(law, 1600, rng)
    assert 1.5 < n1 / n4 < 2.7  # ~1/sqrt(n)
    assert tv(law, law) == 0.0 and tv({(1,): 1.0}, {(2,): 5}) == 1.0
    draws = sample_law(law, 2000, rng)
    assert chi_square_pvalue(draws, law) > 1e-3
    other = low_temperature_law(toy_dir, PROMPT, 4.0, T, EOS)
    assert chi_square_pvalue(sample_law(other, 2000, rng), law) < 1e-6
    assert chi_square_pvalue({(9, 9): 1}, law) == 0.0  # impossible state
