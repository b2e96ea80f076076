"""Checks of an HF config dict before a model is built from it.

Every number the model's shapes are made of is validated here, so a bad config.json is reported as
what it is (e.g. `num_attention_heads must be a positive integer (got 0)`), not as a tensor shape
mismatch or a ZeroDivisionError later. Messages name the source (the config.json path).
"""
from __future__ import annotations

import math

from ..errors import ModelLoadError

# hidden_act values the supported families use (Llama / Qwen2 / Phi-3 / Mistral ship "silu") plus
# the GELU/ReLU variants transformers maps the same MLP to; each is parity-tested (tests/test_loader_checks.py).
SUPPORTED_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_hf_config(d: dict, source: str = "config.json") -> None:
    """Raise ModelLoadError naming `source` and the key for the first invalid value in `d`."""
    def bad(key, what):
        raise ModelLoadError(f"{source}: {key} must be {what} (got {d.get(key)!r})")

    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in d:
            raise ModelLoadError(f"{source} is missing the required key {key!r}")
        if not (_is_int(d[key]) and d[key] > 0):
            bad(key, "a positive integer")
    for key in ("num_key_value_heads", "max_position_embeddings", "head_dim", "sliding_window"):
        v = d.get(key)
        if v is not None and not (_is_int(v) and v > 0):
            bad(key, "a positive integer or absent")
    heads = d["num_attention_heads"]
    kv_heads = d.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ModelLoadError(f"{source}: num_attention_heads ({heads}) must be a multiple of "
                             f"num_key_value_heads ({kv_heads})")
    head_dim = d.get("head_dim")
    if head_dim is None:
        if d["hidden_size"] % heads:
            raise ModelLoadError(f"{source}: hidden_size ({d['hidden_size']}) must be divisible by "
                                 f"num_attention_heads ({heads}) when head_dim is not given")
        head_dim = d["hidden_size"] // heads
    for key in ("rms_norm_eps", "rope_theta"):
        v = d.get(key)
        if v is not None and not (_is_num(v) and v > 0):
            bad(key, "a finite number > 0")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ModelLoadError(f"{source}: rope_scaling / rope_parameters must be an object (got {rope!r})")
    if "rope_theta" in rope and not (_is_num(rope["rope_theta"]) and rope["rope_theta"] > 0):
        raise ModelLoadError(f"{source}: rope_theta must be a finite number > 0 (got {rope['rope_theta']!r})")
    prf = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if not (_is_num(prf) and 0 < prf <= 1):
        raise ModelLoadError(f"{source}: partial_rotary_factor must be in (0, 1] (got {prf!r})")
    rotary = int(head_dim * prf)
    if rotary < 2 or rotary % 2:
        raise ModelLoadError(f"{source}: the rotary dimension head_dim * partial_rotary_factor = {rotary} "
                             "must be an even number >= 2")
    eos = d.get("eos_token_id")
    eos_list = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(_is_int(e) and e >= 0 for e in eos_list):
        bad("eos_token_id", "a token id, a list of token ids, or null")
    act = d.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ModelLoadError(f"{source}: unsupported hidden_act {act!r}; supported: "
                             + ", ".join(SUPPORTED_ACTIVATIONS))
    q = d.get("quantization_config")
    if q:
        method = q.get("quant_method", "?") if isinstance(q, dict) else q
        raise ModelLoadError(f"{source} describes a quantized checkpoint (quantization_config, quant_method "
                             f"{method!r}); quantized checkpoints are not supported: use a float16, bfloat16 "
                             "or float32 checkpoint")
