"""paper.mcmc_power_samp: the context forms a caller of the reference may pass."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers as tf

import powersample_fast as pf
from powersample_fast.errors import ConfigError
from powersample_fast.entrypoints.paper import mcmc_power_samp


@pytest.fixture(scope="module")
def p(tmp_path_factory):
    """A tiny random Llama (vocab 61, EOS 7) as our Transformer, wrapped like the reference's sampler."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=128, eos_token_id=7)
    d = tmp_path_factory.mktemp("paper")
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    model, _ = pf.load(d, device="cpu", dtype=torch.float32)
    return SimpleNamespace(model=model, tokenizer=None)


@pytest.mark.parametrize("context", [
    [1, 2, 3],
    torch.tensor([[1, 2, 3]]),  # tokenizer(..., return_tensors="pt").input_ids
    [[1, 2, 3]],
    torch.tensor([1, 2, 3]),
    np.array([[1, 2, 3]]),
    [np.int64(1), np.int64(2), np.int64(3)],
], ids=["list", "tensor_1xT", "nested_list", "tensor_T", "numpy_1xT", "numpy_ints"])
def test_context_forms_give_the_same_flat_result(p, context):
    want = mcmc_power_samp(p, [1, 2, 3], 0.25, 2, 12, block_num=3, seed=0)
    got = mcmc_power_samp(p, context, 0.25, 2, 12, block_num=3, seed=0)
    gen, lq, target, ratio = got
    assert all(type(x) is int for x in gen) and gen[:3] == [1, 2, 3]
    assert len(gen) - 3 == len(lq) == len(target) and isinstance(ratio, float)
    assert got == want


@pytest.mark.parametrize("context,match", [
    (torch.tensor([[1, 2], [3, 4]]), "one sequence of token ids .*got 2 sequences"),
    ("some text", "not text"),
    (torch.zeros(1, 3), r"dtype torch\.float32"),
])
def test_bad_context_is_named(p, context, match):
    with pytest.raises(ConfigError, match=match):
        mcmc_power_samp(p, context, 0.25, 1, 4, block_num=2)


def test_bool_temp_rejected(p):
    with pytest.raises(ConfigError, match="temp must be > 0"):
        mcmc_power_samp(p, [1], True, 1, 4)
