"""One minimal decoder-only Transformer for the Llama / Qwen2 / Phi-3 / Mistral families.

Families differ only by `ModelConfig` flags (config.py: q/k/v bias, o bias, tied embeddings,
RoPE scaling); weights are stored fused (`wqkv`, `w13`) and the loader fuses HF's separate projections.
RoPE is HF's rotate-half form, so HF safetensors load without permutation. The blocks are in layers.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn as nn

from ..errors import ConfigError
from .config import ModelConfig, rope_inv_freq
from .cpu_linear import linear
from .layers import Block, Embedding, Linear, RMSNorm

if TYPE_CHECKING:  # the engine's storage type, for annotations only
    from ..engine.kv_cache import KVCache


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
        if cache.kv.dtype != self.dtype:
            raise ConfigError(f"KV cache dtype {cache.kv.dtype} differs from the model's {self.dtype}; "
                              "build the cache with dtype=model.dtype")
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
