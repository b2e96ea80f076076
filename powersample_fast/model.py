"""One minimal decoder-only Transformer for the Llama / Qwen2 / Phi-3 / Mistral families.

Families differ only by `ModelConfig` flags (q/k/v bias, o bias, tied embeddings, RoPE scaling);
weights are stored fused (`wqkv`, `w13`) and the loader fuses HF's separate projections.
RoPE is HF's rotate-half form, so HF safetensors load without permutation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config_check import SUPPORTED_ACTIVATIONS, check_hf_config
from .cpu_linear import linear
from .errors import ConfigError, ModelLoadError

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


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear` (oneDNN with a packed weight for fp32 on CPU)."""

    def reset_parameters(self):
        if not self.weight.is_meta:  # see Embedding
            super().reset_parameters()

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class Embedding(nn.Embedding):
    """nn.Embedding that skips the random init of meta parameters: the loader builds the model on the
    meta device and assigns the checkpoint's tensors, and a meta init imports torch._dynamo (~2 s of
    every CLI start, measured)."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)  # norm in fp32, cast back (as HF)


def swap_halves(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


def apply_rope(x, cos, sin_signed, rotary_dim: int):
    """HF's x * cos + rotate_half(x) * sin, bit for bit, with rotate_half(x) * sin computed as
    swap_halves(x) * sin_signed (sin_signed = [-sin, sin] halves; (-a) * b == a * (-b) exactly).
    x: [B, H, T, D]; cos/sin_signed: [B, 1, T, rotary_dim]."""
    if rotary_dim == x.shape[-1]:
        return x * cos + swap_halves(x) * sin_signed
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((xr * cos + swap_halves(xr) * sin_signed, xp), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wqkv = Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, bias=cfg.qkv_bias)
        self.wo = Linear(cfg.n_heads * hd, cfg.dim, bias=cfg.o_bias)

    def forward(self, x, cos, sin, kv: Optional[torch.Tensor], write, mask):
        # x: [B, T, dim]; kv: this layer's cache [2, rows, H_kv, S, D] or None (full causal forward)
        cfg = self.cfg
        B, T, _ = x.shape
        hd = cfg.head_dim
        H, Hk = cfg.n_heads, cfg.n_kv_heads
        qkv = self.wqkv(x)  # [B, T, (H + 2 H_kv) * D]
        # RoPE on q and k together (one set of element-wise ops per layer instead of two)
        qk = qkv[..., :(H + Hk) * hd].view(B, T, H + Hk, hd).transpose(1, 2)  # [B, H + H_kv, T, D]
        q, k = apply_rope(qk, cos, sin, cfg.rotary_dim).split([H, Hk], dim=1)  # [B, H, T, D], [B, H_kv, T, D]
        v = qkv[..., (H + Hk) * hd:].view(B, T, Hk, hd).transpose(1, 2)  # v: [B, H_kv, T, D]
        if kv is None:  # full causal forward; mask is None (causal) or a sliding-window mask [T, T]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=mask is None, attn_mask=mask,
                                               enable_gqa=cfg.n_heads != cfg.n_kv_heads)
        else:
            rows, b_idx, p_idx, kv_len = write
            kc, vc = kv[0, rows], kv[1, rows]  # [B, H_kv, S, D] views (rows is a slice)
            kc[b_idx, :, p_idx] = k.transpose(1, 2).to(kc.dtype)  # [B, T, H_kv, D] into positions
            vc[b_idx, :, p_idx] = v.transpose(1, 2).to(vc.dtype)
            # GQA without expanding K/V: the G query heads of a kv head become G*T query rows
            # (HF's repeat_kv maps query head h to kv head h // G), so SDPA's masked kernels read
            # each cached K/V once. mask: additive [B, 1, G*T, kv_len], built once per forward.
            G = cfg.n_heads // cfg.n_kv_heads
            qg = q.reshape(B, cfg.n_kv_heads, G * T, hd)  # [B, H_kv, G*T, D]
            o = F.scaled_dot_product_attention(qg, kc[:, :, :kv_len], vc[:, :, :kv_len], attn_mask=mask)
            # reshape, not view: CUDA's memory-efficient kernel returns a transposed layout
            o = o.reshape(B, cfg.n_heads, T, hd)  # [B, H, T, D]
        return self.wo(o.transpose(1, 2).reshape(B, T, cfg.n_heads * hd))


def activation(name: str) -> nn.Module:
    """The MLP activation named by HF's `hidden_act` (same functions as transformers' ACT2FN)."""
    if name in ("silu", "swish"):
        return nn.SiLU()
    if name == "gelu":
        return nn.GELU()  # exact (erf)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")  # HF's gelu_new is the same tanh formula
    if name == "relu":
        return nn.ReLU()
    raise ModelLoadError(f"unsupported hidden_act {name!r}; supported: " + ", ".join(SUPPORTED_ACTIVATIONS))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.w13 = Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)  # [gate; up]
        self.w2 = Linear(cfg.intermediate_size, cfg.dim, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x, cos, sin, kv, write, mask):
        h = x + self.attention(self.attention_norm(x), cos, sin, kv, write, mask)
        g, u = self.w13(self.ffn_norm(h)).chunk(2, dim=-1)
        return h + self.w2(self.act(g) * u)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else Linear(cfg.dim, cfg.vocab_size, bias=False)
        inv, scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv, persistent=False)
        self.attention_scaling = scale
        if cfg.rope_type == "longrope":
            self.register_buffer("inv_freq_long", rope_inv_freq(cfg, long=True)[0], persistent=False)
            self.rope_switch = int(cfg.rope_params["original_max_position_embeddings"])
        else:
            self.inv_freq_long = None
            self.rope_switch = None

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype) / .half() would round the RoPE tables; recompute them in fp32 on the new device
        out = super()._apply(fn, *args, **kwargs)
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_rope_buffers(self.tok_embeddings.weight.device)
        return out

    def init_rope_buffers(self, device):
        """Recompute the (non-persistent) RoPE buffers on `device` (after a meta-device build)."""
        self.inv_freq = rope_inv_freq(self.config)[0].to(device)
        if self.inv_freq_long is not None:
            self.inv_freq_long = rope_inv_freq(self.config, long=True)[0].to(device)

    def _rope(self, pos: torch.Tensor, max_pos: Optional[int], dtype):
        # pos: [B, T] int64 -> cos/sin [B, 1, T, rotary_dim]
        inv = self.inv_freq
        if self.rope_switch is not None:
            # HF's longrope rule: long factors once the sequence passes the original length.
            # max_pos None: decide on the device (no host sync; used by captured CUDA graphs)
            if max_pos is None:
                inv = torch.where(pos.max() + 1 > self.rope_switch, self.inv_freq_long, self.inv_freq)
            elif max_pos + 1 > self.rope_switch:
                inv = self.inv_freq_long
        freqs = pos[..., None].float() * inv.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)[:, None]
        sin = (emb.sin() * self.attention_scaling).to(dtype)[:, None]
        s1, s2 = sin.chunk(2, dim=-1)
        return cos, torch.cat((-s1, s2), dim=-1)  # cos, sin_signed (see apply_rope)

    def _check_len(self, n: int):
        if n > self.config.max_seq_len:
            raise ConfigError(
                f"sequence of {n} tokens is longer than the model's context ({self.config.max_seq_len} tokens); "
                "shorten the prompt or lower max_new_tokens"
            )

    def _logits(self, h):
        h = self.norm(h)
        w = self.tok_embeddings.weight if self.output is None else self.output.weight
        return linear(h, w)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward, positions 0..T-1. input_ids: [B, T] -> logits [B, T, V]."""
        B, T = input_ids.shape
        self._check_len(T)
        pos = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        x = self.tok_embeddings(input_ids)
        cos, sin = self._rope(pos, T - 1, x.dtype)
        mask = None
        if self.config.sliding_window is not None and self.config.sliding_window < T:
            i = torch.arange(T, device=input_ids.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.config.sliding_window)
        for layer in self.layers:
            x = layer(x, cos, sin, None, None, mask)
        return self._logits(x)

    def forward_cached(
        self,
        tokens: torch.Tensor,
        cache: "KVCache",
        rows: Union[slice, int] = None,
        last_only: bool = False,
        start_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Prefill or decode with the KV cache. tokens: [B, T] appended at each row's current length
        (per-row positions), cache rows `rows` (a slice of B rows, default the first B; an int r means
        slice(r, r+1)). Returns logits [B, T, V] (or [B, 1, V] with last_only). `start_pos` [B]: the
        rows' current lengths already on the device (saves a host->device copy; must equal them)."""
        B, T = tokens.shape
        if rows is None:
            rows = slice(0, B)
        elif isinstance(rows, int):
            rows = slice(rows, rows + 1)
        start = cache.host_lengths[rows]
        if len(start) != B:
            raise ConfigError(f"tokens has {B} rows but the cache slice {rows} has {len(start)}")
        kv_len = max(start) + T
        self._check_len(kv_len)
        if kv_len > cache.max_len:
            raise ConfigError(f"KV cache holds {cache.max_len} positions but {kv_len} are needed; allocate a larger cache")
        dev = tokens.device
        start_t = start_pos if start_pos is not None else torch.tensor(start, dtype=torch.int64, device=dev)
        pos = start_t[:, None] + torch.arange(T, device=dev)[None]  # pos: [B, T]
        logits = self.cached_core(tokens, pos, cache, rows, kv_len, kv_len - 1, last_only)
        cache.advance(rows, T)
        return logits

    def cached_core(self, tokens, pos, cache: "KVCache", rows: slice, kv_len: int, max_pos: Optional[int],
                    last_only: bool = False) -> torch.Tensor:
        """Shape-static part of `forward_cached` (no host reads, capturable in a CUDA graph): write
        K/V of `tokens` [B, T] at positions `pos` [B, T] of cache rows `rows`, attend over the first
        `kv_len` positions (causally masked per row), return logits. Lengths are not updated."""
        B, T = tokens.shape
        dev = tokens.device
        b_idx = torch.arange(B, device=dev)[:, None].expand(B, T)
        x = self.tok_embeddings(tokens)
        # key j visible to query (b, i) iff j <= pos[b, i]; rows repeated for the G query heads of a
        # kv head (see Attention) -> additive mask [B, 1, G*T, kv_len] in the activation dtype
        G = self.config.n_heads // self.config.n_kv_heads
        j = torch.arange(kv_len, device=dev)[None, None, :]
        visible = j <= pos[:, :, None]  # [B, T, kv_len]
        if self.config.sliding_window is not None:
            visible &= j > pos[:, :, None] - self.config.sliding_window
        visible = visible[:, None].expand(B, G, T, kv_len).reshape(B, 1, G * T, kv_len)
        mask = torch.zeros(visible.shape, dtype=x.dtype, device=dev).masked_fill_(~visible, float("-inf"))
        cos, sin = self._rope(pos, max_pos, x.dtype)
        write = (rows, b_idx, pos, kv_len)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.kv[i], write, mask)
        if last_only:
            x = x[:, -1:]
        return self._logits(x)


from .kv_cache import KVCache  # noqa: E402,F401  (re-exported: it lived here before)
