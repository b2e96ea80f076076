"""The building blocks of `Transformer`: Linear / Embedding (no random init on the meta device),
RMSNorm (fp32, cast back), HF's rotate-half RoPE, attention over a KV cache row span (K/V stored with
n_kv_heads, expanded only inside attention), the MLP activation, and the decoder block."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelLoadError
from .config import ModelConfig
from .config_check import SUPPORTED_ACTIVATIONS
from . import cpu_kernels
from .cpu_linear import linear


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
        if self.weight.dtype == x.dtype and cpu_kernels.fused_ops_on(x):  # one op (cpu_kernels)
            return cpu_kernels.rms_norm(x, self.weight, self.eps)
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
        if cpu_kernels.fused_ops_on(qkv) and cos.dtype == qkv.dtype:  # one op, bit for bit (cpu_kernels)
            qk = cpu_kernels.rope(qkv, cos, sin, H + Hk, hd, cfg.rotary_dim)
        else:
            qk = apply_rope(qkv[..., :(H + Hk) * hd].view(B, T, H + Hk, hd).transpose(1, 2), cos, sin, cfg.rotary_dim)
        q, k = qk.split([H, Hk], dim=1)  # [B, H, T, D], [B, H_kv, T, D]
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
            if T == 1 and hd % 16 == 0 and hd <= 256 and mask is not None and cpu_kernels.fused_ops_on(qg):
                o = cpu_kernels.attn_decode(qg, kc[:, :, :kv_len], vc[:, :, :kv_len], mask)  # cpu_kernels
            else:
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
        gu = self.w13(self.ffn_norm(h))  # [gate; up]
        if isinstance(self.act, nn.SiLU) and cpu_kernels.fused_ops_on(gu):  # one op (cpu_kernels)
            return h + self.w2(cpu_kernels.silu_mul(gu))
        g, u = gu.chunk(2, dim=-1)
        return h + self.w2(self.act(g) * u)
