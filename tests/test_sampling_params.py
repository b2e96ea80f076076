"""SamplingParams and normalize_prompts: numpy/torch numbers accepted, bools rejected, prompt errors
name the actual type, shape and dtype; chat=None applies the chat template when there is one."""
import numpy as np
import pytest
import torch

from powersample_fast.errors import ConfigError
from powersample_fast.prompts import normalize_prompts, use_chat
from powersample_fast.sampling_params import SamplingParams


@pytest.mark.parametrize("kw,want", [
    (dict(alpha=np.float32(2)), dict(alpha=2.0)),
    (dict(alpha=np.int64(3)), dict(alpha=3.0)),
    (dict(alpha=np.float64(0.5), proposal_temperature=np.float32(0.25)), dict(alpha=0.5, proposal_temperature=0.25)),
    (dict(max_new_tokens=np.int64(8), block_size=np.int32(4), mcmc_steps=np.uint8(0)),
     dict(max_new_tokens=8, block_size=4, mcmc_steps=0)),
    (dict(top_k=np.int16(5), n=np.int64(2), seed=np.int64(7)), dict(top_k=5, n=2, seed=7)),
    (dict(n=torch.tensor(3), seed=torch.tensor(11)), dict(n=3, seed=11)),
])
def test_numpy_and_torch_numbers_accepted_as_python_numbers(kw, want):
    p = SamplingParams(**kw)
    for k, v in want.items():
        got = getattr(p, k)
        assert got == v and type(got) is type(v), (k, got)  # stored as plain Python numbers (JSON-able)


@pytest.mark.parametrize("kw,match", [
    (dict(alpha=True), "alpha must be a finite number > 0 .got True"),
    (dict(alpha=np.bool_(True)), "alpha must be a finite number > 0"),
    (dict(proposal_temperature=True), "proposal_temperature must be > 0"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer >= 1 .got True"),
    (dict(block_size=False), "block_size must be an integer >= 1"),
    (dict(mcmc_steps=True), "mcmc_steps must be an integer >= 0 .got True"),
    (dict(top_k=True), "top_k must be an integer >= 1 or None to disable"),
    (dict(n=True), r"n \(samples per prompt\) must be an integer >= 1"),
    (dict(seed=True), "seed must be an int or None"),
    (dict(n=np.float64(2.0)), r"n \(samples per prompt\) must be an integer"),
    (dict(alpha="4"), "alpha must be a finite number"),
    (dict(alpha=np.float32("nan")), "alpha must be a finite number"),
])
def test_bools_and_non_numbers_rejected(kw, match):
    with pytest.raises(ConfigError, match=match):
        SamplingParams(**kw)


def test_numpy_token_ids_accepted():
    assert normalize_prompts([np.int64(5), np.int64(6)], None) == [[5, 6]]
    assert normalize_prompts([[np.int32(1), 2], (np.uint16(3),)], None) == [[1, 2], [3]]
    assert normalize_prompts(np.array([[4, 5]], dtype=np.int64), None) == [[4, 5]]
    assert normalize_prompts([torch.tensor([1, 2]), np.array([3])], None) == [[1, 2], [3]]
    assert normalize_prompts([torch.tensor(9), torch.tensor(8)], None) == [[9, 8]]
    out = normalize_prompts(torch.tensor([[1, 2, 3]]), None)
    assert out == [[1, 2, 3]] and all(type(x) is int for x in out[0])


@pytest.mark.parametrize("prompts,match", [
    (torch.zeros(2, 3, 4, dtype=torch.long), r"got torch\.Tensor of shape \(2, 3, 4\), dtype torch\.int64"),
    (torch.zeros(1, 3), r"got torch\.Tensor of shape \(1, 3\), dtype torch\.float32"),
    (torch.tensor([True, False]), r"dtype torch\.bool"),
    (np.zeros((2, 2, 2), dtype=np.int64), r"got numpy\.ndarray of shape \(2, 2, 2\), dtype int64"),
    (np.array([1.0, 2.0]), r"got numpy\.ndarray of shape \(2,\), dtype float64"),
    ([True, False], "token ids must be integers.*got list containing bool True"),
    ([1, 2.5], "token ids must be integers.*got list containing float 2.5"),
    ([[1, 2], [3, 4.0]], "prompt 1 must be a string or a list of token ids .got list containing float 4.0"),
    ([torch.zeros(2, 2, dtype=torch.long)], "prompt 0 must be a 1-D sequence"),
    ([torch.zeros(3)], r"prompt 0 must be token ids .* dtype torch\.float32"),
    (42, "got int"),
])
def test_prompt_errors_name_type_shape_dtype(prompts, match):
    with pytest.raises(ConfigError, match=match):
        normalize_prompts(prompts, None)


class _Tok:
    """Minimal tokenizer: one id per character; a template adds [100] ... [101] around the prompt."""

    def __init__(self, template):
        self.chat_template = template

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def apply_chat_template(self, msgs, add_generation_prompt, tokenize):
        return [100] + self.encode(msgs[0]["content"]) + [101]


def test_chat_none_means_auto():
    with_t, without = _Tok("{{ template }}"), _Tok(None)
    assert normalize_prompts("ab", with_t) == [[100, 97, 98, 101]]  # default chat=None: template used
    assert normalize_prompts("ab", with_t, chat=None) == [[100, 97, 98, 101]]
    assert normalize_prompts("ab", with_t, chat=False) == [[97, 98]]
    assert normalize_prompts("ab", without) == [[97, 98]]  # no template: plain encode
    assert normalize_prompts("ab", without, chat=None) == [[97, 98]]
    assert use_chat(with_t, None) is True and use_chat(without, None) is False
    with pytest.raises(ConfigError, match="no chat template; pass chat=False"):
        normalize_prompts("ab", without, chat=True)


@pytest.mark.parametrize("kw", [dict(proposal_temperature=1e-38), dict(proposal_temperature=1e-7),
                                dict(alpha=1e39), dict(alpha=2e6)])
def test_overflowing_temperature_or_alpha_is_a_config_error(kw):
    # issue 19 item 5: these overflowed logits / tau and surfaced as NonFiniteLogitsError (HTTP 500)
    with pytest.raises(ConfigError, match="overflow"):
        SamplingParams(**kw)
    SamplingParams(proposal_temperature=1e-3, alpha=1e3)  # near-greedy and very sharp still accepted


def test_lone_surrogate_prompt_is_a_config_error():
    from powersample_fast.prompts import normalize_prompts

    class Tok:  # the bad prompt never reaches it: the check runs before the tokenizer
        def encode(self, text, **k):
            assert text == "fine", "tokenizer called on invalid text"
            return [1, 2]

    for bad in ("\ud800x", "a\udcffb"):
        with pytest.raises(ConfigError, match="prompt 1 is not valid text"):
            normalize_prompts(["fine", bad], Tok(), chat=False)
