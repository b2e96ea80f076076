"""Loader checks: hidden_act (parity with transformers per activation), non-float weights, config
numbers validated before any tensor is read, per-projection shape checks before fusion."""
import json

import pytest
import torch
import transformers as tf

import powersample_fast as pf
from powersample_fast.models.config_check import SUPPORTED_ACTIVATIONS
from powersample_fast.errors import ModelLoadError

# tiny Llama (real Llama-3.2-1B: dim 2048, 16 layers, 32 heads / 8 kv heads); odd vocab
BASE = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=128)


def _save(tmp_path, name="m", **extra):
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**BASE, **extra)).eval()
    for p in model.parameters():  # larger than the 0.02 init, so the activation matters to the logits
        p.data.normal_(0, 0.2)
    d = tmp_path / name
    model.save_pretrained(d)
    return d, model


def _edit_config(d, **kv):
    c = json.loads((d / "config.json").read_text())
    c.update(kv)
    (d / "config.json").write_text(json.dumps(c))


def _edit_tensors(d, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"))


@pytest.mark.parametrize("act", SUPPORTED_ACTIVATIONS)
def test_hidden_act_matches_transformers(tmp_path, act):
    d, ref = _save(tmp_path, hidden_act=act)
    model, _ = pf.load(d, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = model(ids)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4


def test_gelu_is_not_run_as_silu(tmp_path):
    """The same weights give different logits under gelu and silu (so the parity test above can fail)."""
    d, _ = _save(tmp_path)
    silu, _ = pf.load(d, device="cpu")
    _edit_config(d, hidden_act="gelu")
    gelu, _ = pf.load(d, device="cpu")
    ids = torch.arange(10)[None]
    assert not torch.allclose(silu(ids), gelu(ids), atol=1e-3)


def test_unsupported_hidden_act_is_named(tmp_path):
    d, _ = _save(tmp_path)
    _edit_config(d, hidden_act="quick_gelu")
    with pytest.raises(ModelLoadError, match=r"config\.json: unsupported hidden_act 'quick_gelu'; supported: silu"):
        pf.load(d)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.bool, torch.int32])
def test_non_float_weights_rejected_by_name(tmp_path, dtype):
    d, _ = _save(tmp_path)
    name = "model.layers.1.mlp.down_proj.weight"
    _edit_tensors(d, lambda sd: sd.__setitem__(name, sd[name].to(dtype)))
    with pytest.raises(ModelLoadError, match=rf"tensor {name} .* stored as {dtype}; quantized or integer "
                                             "checkpoints are not supported"):
        pf.load(d)


def test_quantization_config_rejected(tmp_path):
    d, _ = _save(tmp_path)
    _edit_config(d, quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True})
    with pytest.raises(ModelLoadError, match="quantized checkpoint.*'bitsandbytes'.*not supported"):
        pf.load(d)


@pytest.mark.parametrize("text", ["[1, 2, 3]", '"LlamaForCausalLM"', "null", "7"])
def test_config_that_is_not_an_object(tmp_path, text):
    d, _ = _save(tmp_path)
    (d / "config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=r"config\.json must hold a JSON object"):
        pf.load(d)


@pytest.mark.parametrize("edit,match", [
    (dict(num_attention_heads=0), r"num_attention_heads must be a positive integer \(got 0\)"),
    (dict(num_attention_heads=-4), r"num_attention_heads must be a positive integer \(got -4\)"),
    (dict(hidden_size=32.5), r"hidden_size must be a positive integer \(got 32.5\)"),
    (dict(num_hidden_layers=True), r"num_hidden_layers must be a positive integer \(got True\)"),
    (dict(vocab_size="97"), r"vocab_size must be a positive integer \(got '97'\)"),
    (dict(intermediate_size=None), r"intermediate_size must be a positive integer \(got None\)"),
    (dict(num_key_value_heads=3), r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    (dict(num_key_value_heads=0), r"num_key_value_heads must be a positive integer or absent \(got 0\)"),
    (dict(num_attention_heads=5, num_key_value_heads=1, head_dim=None),
     r"hidden_size \(32\) must be divisible by num_attention_heads \(5\)"),
    (dict(max_position_embeddings=0), r"max_position_embeddings must be a positive integer"),
    (dict(rms_norm_eps=-1.0), r"rms_norm_eps must be a finite number > 0"),
    (dict(eos_token_id="</s>"), r"eos_token_id must be a token id"),
    (dict(architectures="LlamaForCausalLM"), r"architectures must be a list of class names"),
])
def test_config_numbers_validated_first(tmp_path, edit, match):
    d, _ = _save(tmp_path)
    _edit_config(d, **edit)
    with pytest.raises(ModelLoadError, match=str(d / "config.json").replace(".", r"\.") + ": " + match):
        pf.load(d)


def test_missing_config_key_named(tmp_path):
    d, _ = _save(tmp_path)
    c = json.loads((d / "config.json").read_text())
    del c["intermediate_size"]
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ModelLoadError, match="missing the required key 'intermediate_size'"):
        pf.load(d)


@pytest.mark.parametrize("name,shape", [
    ("model.layers.0.self_attn.k_proj.weight", (16, 31)),  # wrong input dim: used to fail in torch.cat
    ("model.layers.1.self_attn.q_proj.weight", (30, 32)),
    ("model.layers.0.mlp.up_proj.weight", (48, 33)),
    ("model.layers.0.self_attn.o_proj.weight", (32, 31)),
])
def test_projection_shape_checked_before_fusion(tmp_path, name, shape):
    d, _ = _save(tmp_path)
    _edit_tensors(d, lambda sd: sd.__setitem__(name, torch.zeros(shape)))
    with pytest.raises(ModelLoadError, match=rf"tensor {name} in .* has shape \({shape[0]}, {shape[1]}\), "
                                             r"expected \(\d+, \d+\) from config\.json"):
        pf.load(d)


@pytest.mark.parametrize("field,value,match", [
    ("n_heads", 0, r"ModelConfig.n_heads must be a positive integer \(got 0\)"),
    ("n_kv_heads", 0, r"ModelConfig.n_kv_heads must be a positive integer \(got 0\)"),
    ("dim", 30, r"ModelConfig.dim \(30\) must be divisible by n_heads \(4\)"),
    ("vocab_size", 9.5, r"ModelConfig.vocab_size must be a positive integer \(got 9.5\)"),
])
def test_hand_built_model_config_checked(field, value, match):
    """A ModelConfig built in code (not from config.json) is validated too."""
    from powersample_fast.models.config import ModelConfig

    kw = dict(arch="LlamaForCausalLM", vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
              intermediate_size=48, max_seq_len=128)
    kw[field] = value
    with pytest.raises(ModelLoadError, match=match):
        ModelConfig(**kw)
