"""The model's configuration (`ModelConfig`, read from an HF config.json) and the RoPE frequency
tables it implies (`rope_inv_freq`). `transformer.py` builds the network from it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from .config_check import check_hf_config
from ..errors import ModelLoadError

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Phi3ForCausalLM",
    "MistralForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "su")


@dataclass
class ModelConfig:
    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_params: dict = field(default_factory=dict)
    partial_rotary_factor: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    tie_embeddings: bool = False
    eos_token_ids: Tuple[int, ...] = ()
    bos_token_id: Optional[int] = None
    sliding_window: Optional[int] = None  # a query sees the last `sliding_window` positions (itself included)
    hidden_act: str = "silu"  # MLP activation: act(gate) * up (config_check.SUPPORTED_ACTIVATIONS)

    def __post_init__(self):
        # a config read by from_hf was checked by config_check; one built by hand is checked here
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "intermediate_size", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ModelLoadError(f"ModelConfig.{name} must be a positive integer (got {v!r})")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ModelLoadError(f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                                     "when head_dim is not given")
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.n_kv_heads})"
            )
        if self.rope_type == "su":  # old name of longrope (early Phi-3 configs)
            self.rope_type = "longrope"
        self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Build from an HF `config.json` dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`);
        `source` (the file) is named in errors."""
        if not isinstance(d, dict):
            raise ModelLoadError(f"{source} must hold a JSON object (got {type(d).__name__}); "
                                 "pass an HF-format model directory")
        archs = d.get("architectures") or []
        if not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
            raise ModelLoadError(f"{source}: architectures must be a list of class names such as "
                                 f"[\"LlamaForCausalLM\"] (got {archs!r})")
        arch = archs[0] if archs else {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                       "phi3": "Phi3ForCausalLM", "mistral": "MistralForCausalLM"}.get(
            d.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported architecture {arch or d.get('model_type')!r}; supported: "
                + ", ".join(SUPPORTED_ARCHITECTURES)
            )
        check_hf_config(d, source)
        try:
            dim = int(d["hidden_size"])
            n_heads = int(d["num_attention_heads"])
            rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
            theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
            rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ModelLoadError(
                    f"unsupported RoPE scaling {rope_type!r}; supported: " + ", ".join(SUPPORTED_ROPE_TYPES)
                )
            if "original_max_position_embeddings" not in rope and "original_max_position_embeddings" in d:
                rope["original_max_position_embeddings"] = d["original_max_position_embeddings"]
            eos = d.get("eos_token_id")
            eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
            if d.get("mlp_bias"):
                raise ModelLoadError("mlp_bias=true is not supported")
            if arch == "Qwen2ForCausalLM" and d.get("use_sliding_window") and d.get("sliding_window"):
                raise ModelLoadError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
            window = d.get("sliding_window") if arch in ("MistralForCausalLM", "Phi3ForCausalLM") else None
            is_qwen = arch == "Qwen2ForCausalLM"
            attn_bias = bool(d.get("attention_bias", False))
            return cls(
                arch=arch,
                vocab_size=int(d["vocab_size"]),
                dim=dim,
                n_layers=int(d["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(d.get("num_key_value_heads") or n_heads),
                intermediate_size=int(d["intermediate_size"]),
                max_seq_len=int(d.get("max_position_embeddings", 2048)),
                norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                head_dim=d.get("head_dim") or None,
                rope_theta=float(theta),
                rope_type=rope_type,
                rope_params=rope,
                partial_rotary_factor=float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))),
                qkv_bias=is_qwen or attn_bias,
                o_bias=attn_bias and not is_qwen,
                tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                eos_token_ids=tuple(int(e) for e in eos),
                bos_token_id=d.get("bos_token_id"),
                sliding_window=int(window) if window else None,
                hidden_act=d.get("hidden_act", "silu"),
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json is missing the required key {e.args[0]!r}") from None


def rope_inv_freq(cfg: ModelConfig, long: bool = False) -> Tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2] fp32 on the CPU, attention scaling) for the config's RoPE kind (as
    transformers). Always on the CPU, also inside the loader's meta-device build: meta arithmetic
    imports torch._dynamo (~1 s of every start, measured)."""
    with torch.device("cpu"):
        return _rope_inv_freq(cfg, long)


def _rope_inv_freq(cfg: ModelConfig, long: bool) -> Tuple[torch.Tensor, float]:
    dim = cfg.rotary_dim
    base = cfg.rope_theta
    p = cfg.rope_params
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scale = 1.0
    if cfg.rope_type == "linear":
        inv = inv / float(p["factor"])
    elif cfg.rope_type == "llama3":
        factor, lo, hi = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
        old = float(p["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        inv_l = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wl < hi_wl) * ~(wl > lo_wl)
        inv = torch.where(medium, smoothed, inv_l)
    elif cfg.rope_type == "longrope":
        orig = p.get("original_max_position_embeddings")
        if orig is None:
            raise ModelLoadError("longrope scaling needs original_max_position_embeddings in config.json")
        factor = p.get("factor") or cfg.max_seq_len / orig
        scale = p.get("attention_factor")
        if scale is None:
            scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = torch.tensor(p["long_factor"] if long else p["short_factor"], dtype=torch.float32)
        inv = 1.0 / (ext * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv, float(scale)
