"""One minimal decoder-only Transformer for the Llama / Qwen2 / Phi-3 / Mistral families.

Families differ only by `ModelConfig` flags (model_config.py: q/k/v bias, o bias, tied embeddings,
RoPE scaling); weights are stored fused (`wqkv`, `w13`) and the loader fuses HF's separate projections.
RoPE is HF's rotate-half form, so HF safetensors load without permutation.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config_check import SUPPORTED_ACTIVATIONS
from .cpu_linear import linear
from .errors import ConfigError, ModelLoadError
from .model_config import ModelConfig, rope_inv_freq


class _NoMetaInit:
    """Skips the random init of meta parameters: the loader builds the model on the meta device and
    assigns the checkpoint's tensors, and a meta init imports torch._dynamo (~2 s of every CLI
    start, measured)."""

    def reset_parameters(self):
        if not self.weight.is_meta:
            super().reset_parameters()


class Linear(_NoMetaInit, nn.Linear):
    """nn.Linear whose forward is `linear` (oneDNN with a packed weight for fp32 on CPU)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class Embedding(_NoMetaInit, nn.Embedding):
    """nn.Embedding without the random init of meta parameters."""


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
