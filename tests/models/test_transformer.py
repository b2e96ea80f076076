"""Model parity with transformers (fp32), cached decode, KV truncate/fork, bf16, loader errors."""
import json
import shutil

import pytest
import torch
import transformers as tf

import powersample_fast as pf
from powersample_fast.errors import ConfigError, ModelLoadError

# Tiny configs of each family (real sizes: Llama-3.2-1B dim 2048 x 16 layers, Qwen2.5-1.5B dim 1536 x 28,
# Phi-3.5-mini dim 3072 x 32). Odd vocab so nothing relies on powers of two.
BASE = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=128)

LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.7], "long_factor": [1.5, 2.0, 3.0, 5.0],
            "original_max_position_embeddings": 32}

CASES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
    "llama_tied": (tf.LlamaConfig, tf.LlamaForCausalLM, {"tie_word_embeddings": True}),
    "llama_bias": (tf.LlamaConfig, tf.LlamaForCausalLM, {"attention_bias": True}),
    "llama3_rope": (tf.LlamaConfig, tf.LlamaForCausalLM, {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "linear_rope": (tf.LlamaConfig, tf.LlamaForCausalLM, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0}),
    "phi3_longrope": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0, "rope_scaling": LONGROPE,
                                                          "original_max_position_embeddings": 32}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
    "mistral_window": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 8}),
    "phi3_window_partial": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0, "sliding_window": 11,
                                                                "partial_rotary_factor": 0.5}),
}


def _save(tmp_path, name, legacy=False, shard=False, seed=0):
    cfg_cls, model_cls, extra = CASES[name]
    torch.manual_seed(seed)
    kw = dict(BASE, **extra)
    if cfg_cls is tf.Phi3Config:
        kw["num_attention_heads"], kw["num_key_value_heads"] = 4, 4  # head_dim 8 -> 4 rope factors
    model = model_cls(cfg_cls(**kw)).eval()
    for p in model.parameters():  # larger weights than the 0.02 init, so errors are not hidden by tiny logits
        p.data.normal_(0, 0.2)
    d = tmp_path / name
    model.save_pretrained(d, max_shard_size="20KB" if shard else "5GB")
    if legacy:  # rewrite as transformers 4.x writes configs: rope_scaling + rope_theta at top level
        c = json.loads((d / "config.json").read_text())
        rp = c.pop("rope_parameters", None) or {}
        c["rope_theta"] = rp.pop("rope_theta", 10000.0)
        if rp.get("rope_type", "default") != "default":
            c["rope_scaling"] = rp
        (d / "config.json").write_text(json.dumps(c))
    return d, model


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("legacy", [False, True], ids=["cfg5x", "cfg4x"])
def test_logits_match_transformers(tmp_path, name, legacy):
    d, ref_model = _save(tmp_path, name, legacy=legacy)
    model, tok = pf.load(d, device="cpu", dtype=torch.float32)
    assert tok is None
    T = 50 if name == "phi3_longrope" else 37  # 50 > original 32: exercises longrope's long factors
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = ref_model(ids).logits
    assert _rel(model(ids), ref) <= 1e-4
    if name == "phi3_longrope":  # short sequence: short factors
        with torch.no_grad():
            assert _rel(model(ids[:, :20]), ref_model(ids[:, :20]).logits) <= 1e-4


def test_sharded_checkpoint(tmp_path):
    d, ref_model = _save(tmp_path, "qwen2", shard=True)
    assert (d / "model.safetensors.index.json").exists()
    model, _ = pf.load(d, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 11))
    with torch.no_grad():
        assert _rel(model(ids), ref_model(ids).logits) <= 1e-4


@pytest.mark.parametrize("name", ["llama", "qwen2", "phi3", "mistral_window"])
def test_cached_decode_equals_full_forward(tmp_path, name):
    d, _ = _save(tmp_path, name)
    model, _ = pf.load(d, device="cpu", dtype=torch.float32)
    ids = torch.randint(0, 97, (3, 30), generator=torch.Generator().manual_seed(2))
    full = model(ids)
    cache = pf.KVCache(model.config, 3, 40, dtype=model.dtype)
    outs = [model.forward_cached(ids[:, :9], cache)]
    for i in range(9, 30):
        outs.append(model.forward_cached(ids[:, i:i + 1], cache))
    assert _rel(torch.cat(outs, 1), full) <= 1e-4
    assert cache.host_lengths == [30, 30, 30]
    # ragged rows: prefill rows one at a time with different lengths, then decode together
    cache2 = pf.KVCache(model.config, 3, 40, dtype=model.dtype)
    lens = [5, 12, 8]
    last = [model.forward_cached(ids[r:r + 1, :n], cache2, rows=r, last_only=True)[0, -1] for r, n in enumerate(lens)]
    for r, n in enumerate(lens):
        assert _rel(last[r], full[r, n - 1]) <= 1e-4
    nxt = torch.stack([ids[r, n] for r, n in enumerate(lens)])[:, None]
    step = model.forward_cached(nxt, cache2)
    for r, n in enumerate(lens):
        assert _rel(step[r, 0], full[r, n]) <= 1e-4


def test_truncate_and_fork_then_decode(tmp_path):
    d, _ = _save(tmp_path, "llama")
    model, _ = pf.load(d, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (1, 24), generator=g)
    alt = torch.randint(0, 97, (1, 10), generator=g)
    cache = pf.KVCache(model.config, 4, 40, dtype=model.dtype)
    model.forward_cached(ids, cache, rows=0)
    # truncate row 0 to 14, decode a different continuation: equals recomputation from scratch
    cache.truncate(0, 14)
    out = model.forward_cached(alt, cache, rows=0)
    ref = model(torch.cat([ids[:, :14], alt], 1))[:, 14:]
    assert _rel(out, ref) <= 1e-4
    # fork: copy row 0's first 9 positions into rows 2 and 3, decode different tokens in each
    cache.fork([0, 0], [2, 3], [9, 9])
    assert cache.host_lengths[2:] == [9, 9]
    o2 = model.forward_cached(alt[:, :4], cache, rows=2)
    o3 = model.forward_cached(alt[:, 4:8], cache, rows=3)
    assert _rel(o2, model(torch.cat([ids[:, :9], alt[:, :4]], 1))[:, 9:]) <= 1e-4
    assert _rel(o3, model(torch.cat([ids[:, :9], alt[:, 4:8]], 1))[:, 9:]) <= 1e-4
    # copy_range: restore positions of a row from a backup row
    cache.copy_range([2], [1], [0], [13])
    cache.host_lengths[1] = 13
    o1 = model.forward_cached(alt[:, 9:10], cache, rows=1)
    assert _rel(o1, model(torch.cat([ids[:, :9], alt[:, :4], alt[:, 9:10]], 1))[:, -1:]) <= 1e-4


def test_bf16_within_bf16_error(tmp_path):
    d, _ = _save(tmp_path, "llama")
    m32, _ = pf.load(d, device="cpu", dtype=torch.float32)
    m16, _ = pf.load(d, device="cpu", dtype="bfloat16")
    assert m16.tok_embeddings.weight.dtype == torch.bfloat16 and m16.inv_freq.dtype == torch.float32
    assert pf.load(d, device="cpu")[0].to(torch.bfloat16).inv_freq.dtype == torch.float32  # RoPE tables stay fp32
    ids = torch.randint(0, 97, (2, 20))
    ref = m32(ids)
    out = m16(ids)
    assert out.dtype == torch.bfloat16
    # bf16 has 8 mantissa bits (eps 2**-8 ~ 3.9e-3); a 2-layer net accumulates a few ulps
    assert _rel(out, ref) <= 0.05
    cache = pf.KVCache(m16.config, 2, 24, dtype=torch.bfloat16)
    step = torch.cat([m16.forward_cached(ids[:, :10], cache)] +
                     [m16.forward_cached(ids[:, i:i + 1], cache) for i in range(10, 20)], 1)
    assert _rel(step, ref) <= 0.05


def test_error_missing_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        pf.load(tmp_path / "nope")


def test_error_no_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        pf.load(tmp_path / "m")


def test_error_unsupported_architecture(tmp_path):
    d, _ = _save(tmp_path, "llama")
    c = json.loads((d / "config.json").read_text())
    c["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*LlamaForCausalLM.*Qwen2ForCausalLM.*Phi3"):
        pf.load(d)


def _rewrite_tensors(d, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    fn(sd)
    save_file(sd, str(d / "model.safetensors"))


def test_error_missing_tensor(tmp_path):
    d, _ = _save(tmp_path, "llama")
    _rewrite_tensors(d, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing tensor.*layers\.1\.w2\.weight"):
        pf.load(d)
    d, _ = _save(tmp_path / "b", "llama")
    _rewrite_tensors(d, lambda sd: sd.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(ModelLoadError, match="missing tensor.*k_proj"):
        pf.load(d)


def test_error_unexpected_tensor(tmp_path):
    d, _ = _save(tmp_path, "llama")
    _rewrite_tensors(d, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(ModelLoadError, match=r"unexpected tensor.*model\.layers\.0\.extra\.weight"):
        pf.load(d)


def test_error_wrong_shape(tmp_path):
    d, _ = _save(tmp_path, "llama")
    _rewrite_tensors(d, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(31)))
    with pytest.raises(ModelLoadError, match=r"norm\.weight.*shape \(31,\).*expected \(32,\)"):
        pf.load(d)


def test_error_unreadable_safetensors(tmp_path):
    d, _ = _save(tmp_path, "llama")
    (d / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot read safetensors"):
        pf.load(d)


def test_error_unsupported_dtype(tmp_path):
    d, _ = _save(tmp_path, "llama")
    with pytest.raises(ConfigError, match="unsupported dtype"):
        pf.load(d, dtype="int8")
    with pytest.raises(ConfigError, match="unsupported dtype"):
        pf.load(d, dtype=torch.float64)


def test_error_sequence_longer_than_context(tmp_path):
    d, _ = _save(tmp_path, "llama")
    model, _ = pf.load(d, device="cpu")
    with pytest.raises(ConfigError, match="longer than the model's context"):
        model(torch.zeros(1, 129, dtype=torch.long))
    cache = pf.KVCache(model.config, 1, 200)  # default dtype = the default-loaded model's, on every CPU
    model.forward_cached(torch.zeros(1, 120, dtype=torch.long), cache)
    with pytest.raises(ConfigError, match="longer than the model's context"):
        model.forward_cached(torch.zeros(1, 9, dtype=torch.long), cache)


@pytest.mark.parametrize("forced", ["float32", "bfloat16"])
def test_kv_cache_dtype_follows_model_and_mismatch_is_named(tmp_path, monkeypatch, forced):
    # issue 19 item 1: on an AMX CPU the model loads in bf16; a cache built without a dtype must match
    # it, and a mismatched cache is a ConfigError naming both dtypes, not SDPA's RuntimeError
    monkeypatch.setenv("POWERSAMPLE_FAST_DTYPE", forced)
    d, _ = _save(tmp_path, "llama")
    model, _ = pf.load(d, device="cpu")
    assert model.dtype == getattr(torch, forced)
    cache = pf.KVCache(model.config, 1, 16)
    assert cache.kv.dtype == model.dtype
    model.forward_cached(torch.zeros(1, 3, dtype=torch.long), cache)
    other = torch.float32 if forced == "bfloat16" else torch.bfloat16
    bad = pf.KVCache(model.config, 1, 16, dtype=other)
    with pytest.raises(ConfigError, match=f"KV cache dtype {other} differs from the model's {model.dtype}"):
        model.forward_cached(torch.zeros(1, 3, dtype=torch.long), bad)


def test_no_weights_file(tmp_path):
    d, _ = _save(tmp_path, "llama")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        pf.load(d)
    shutil.rmtree(d)


@pytest.mark.parametrize("name", ["phi3_longrope", "qwen2"])
def test_static_core_equals_forward_cached(tmp_path, name):
    """`cached_core` as CUDA graphs run it (KV span padded past the longest row, RoPE factor chosen
    on the device: longrope switches to long factors past 32 positions here) equals the eager
    `forward_cached` step by step."""
    d, _ = _save(tmp_path, name)
    model, _ = pf.load(d, device="cpu", dtype=torch.float32)
    if name == "phi3_longrope":
        assert model.rope_switch == 32 and model.attention_scaling > 1.0
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(5))
    eager, static = pf.KVCache(model.config, 2, 64, dtype=model.dtype), pf.KVCache(model.config, 2, 64, dtype=model.dtype)
    model.forward_cached(ids[:, :20], eager)
    model.forward_cached(ids[:, :20], static)
    for i in range(20, 45):
        ref = model.forward_cached(ids[:, i:i + 1], eager)
        out = model.cached_core(ids[:, i:i + 1], torch.tensor([[i], [i]]), static, slice(0, 2), kv_len=64,
                                max_pos=None)
        static.advance(slice(0, 2), 1)
        assert _rel(out, ref) <= 1e-5


def test_qwen2_sliding_window_rejected(tmp_path):
    d, _ = _save(tmp_path, "qwen2")
    c = json.loads((d / "config.json").read_text())
    c.update(use_sliding_window=True, sliding_window=16)
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ModelLoadError, match="sliding-window attention .* not supported"):
        pf.load(d)


def test_su_rope_alias_and_float16(tmp_path):
    d, ref_model = _save(tmp_path, "phi3_longrope")
    c = json.loads((d / "config.json").read_text())
    (c.get("rope_parameters") or c["rope_scaling"])["rope_type"] = "su"  # early Phi-3 configs
    (d / "config.json").write_text(json.dumps(c))
    model, _ = pf.load(d, device="cpu", dtype=torch.float32)
    assert model.config.rope_type == "longrope"
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = ref_model(ids).logits
    assert _rel(model(ids), ref) <= 1e-4
    m16, _ = pf.load(d, device="cpu", dtype="float16")
    assert m16.tok_embeddings.weight.dtype == torch.float16
    assert _rel(m16(ids), ref) <= 0.02  # fp16: 11 mantissa bits
