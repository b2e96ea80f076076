"""Checkpoint tensors -> our fused state dict: the safetensors files of a directory (single,
sharded with an index, or any *.safetensors), HF names mapped to ours (q/k/v fused into `wqkv`,
gate/up into `w13`), dtypes and every shape checked against the config before anything is fused."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterator, Tuple

import torch

from ..errors import ModelLoadError
from .config import ModelConfig

_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def _safetensor_files(path: Path):
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"cannot parse {index}: {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ModelLoadError(f"shard(s) listed in {index.name} are missing from {path}: {', '.join(missing)}")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise ModelLoadError(f"no model.safetensors (or sharded *.safetensors with an index) in {path}")


def _iter_tensors(files) -> Iterator[Tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    yield name, st.get_tensor(name)
        except ModelLoadError:
            raise
        except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt files
            raise ModelLoadError(f"cannot read safetensors file {f}: {e}") from None


def _expected_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    hd = cfg.head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    s: Dict[str, Tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, cfg.dim), "norm.weight": (cfg.dim,)}
    if not cfg.tie_embeddings:
        s["output.weight"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        s[p + "attention_norm.weight"] = (cfg.dim,)
        s[p + "ffn_norm.weight"] = (cfg.dim,)
        s[p + "attention.wqkv.weight"] = (q + 2 * kv, cfg.dim)
        if cfg.qkv_bias:
            s[p + "attention.wqkv.bias"] = (q + 2 * kv,)
        s[p + "attention.wo.weight"] = (cfg.dim, q)
        if cfg.o_bias:
            s[p + "attention.wo.bias"] = (cfg.dim,)
        s[p + "w13.weight"] = (2 * cfg.intermediate_size, cfg.dim)
        s[p + "w2.weight"] = (cfg.dim, cfg.intermediate_size)
    return s


def _part_shape(cfg: ModelConfig, ours: str, part: int) -> Tuple[int, ...]:
    """Shape of one HF tensor that is fused into `ours` (q/k/v into wqkv, gate/up into w13)."""
    hd = cfg.head_dim
    if "wqkv" in ours:
        rows = (cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd)[part]
        return (rows,) if ours.endswith("bias") else (rows, cfg.dim)
    return (cfg.intermediate_size, cfg.dim)


# float dtypes a checkpoint may store; anything else (int8, uint8, bool, float8, ...) is a quantized
# or foreign format whose raw values would be cast to float as if they were weights
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# HF name -> (our name, part index within a fused tensor or None)
_SIMPLE = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
    "self_attn.q_proj.weight": ("attention.wqkv.weight", 0),
    "self_attn.k_proj.weight": ("attention.wqkv.weight", 1),
    "self_attn.v_proj.weight": ("attention.wqkv.weight", 2),
    "self_attn.q_proj.bias": ("attention.wqkv.bias", 0),
    "self_attn.k_proj.bias": ("attention.wqkv.bias", 1),
    "self_attn.v_proj.bias": ("attention.wqkv.bias", 2),
    "self_attn.qkv_proj.weight": ("attention.wqkv.weight", None),
    "self_attn.qkv_proj.bias": ("attention.wqkv.bias", None),
    "self_attn.o_proj.weight": ("attention.wo.weight", None),
    "self_attn.o_proj.bias": ("attention.wo.bias", None),
    "mlp.gate_proj.weight": ("w13.weight", 0),
    "mlp.up_proj.weight": ("w13.weight", 1),
    "mlp.gate_up_proj.weight": ("w13.weight", None),
    "mlp.down_proj.weight": ("w2.weight", None),
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _map_name(hf_name: str):
    if hf_name in _SIMPLE:
        return _SIMPLE[hf_name], None
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER:
        ours, part = _LAYER[m.group(2)]
        return f"layers.{m.group(1)}.{ours}", part
    return None, None


def load_state_dict(path, cfg: ModelConfig, dtype: torch.dtype, device, tensors=None) -> Dict[str, torch.Tensor]:
    """Map HF-named tensors (from the safetensors in `path`, or the `tensors` iterable of
    (name, tensor)) to our fused names, validating names and shapes against `cfg`."""
    expected = _expected_shapes(cfg)
    parts: Dict[str, Dict[int, torch.Tensor]] = {}
    n_parts = {}
    out: Dict[str, torch.Tensor] = {}
    unexpected = []
    if tensors is None:
        tensors = _iter_tensors(_safetensor_files(path))
    for name, t in tensors:
        if _IGNORED.match(name):
            continue
        ours, part = _map_name(name)
        if ours is None or ours not in expected:
            if ours == "output.weight" and cfg.tie_embeddings:
                continue  # some checkpoints store the tied head anyway
            unexpected.append(name)
            continue
        if t.dtype not in _FLOAT_DTYPES:
            raise ModelLoadError(
                f"tensor {name} in {path} is stored as {t.dtype}; quantized or integer checkpoints are not "
                "supported: use a float16, bfloat16 or float32 checkpoint (dequantize it first)"
            )
        want = expected[ours] if part is None else _part_shape(cfg, ours, part)
        if tuple(t.shape) != want:
            raise ModelLoadError(
                f"tensor {name} in {path} has shape {tuple(t.shape)}, expected {want} from config.json"
            )
        t = t.to(device=device, dtype=dtype)
        if part is None:
            out[ours] = t
        else:
            parts.setdefault(ours, {})[part] = t
            n_parts[ours] = 3 if "wqkv" in ours else 2
    if unexpected:
        raise ModelLoadError(
            f"unexpected tensor(s) in checkpoint {path} for {cfg.arch}: {', '.join(unexpected[:8])}"
            + (" ..." if len(unexpected) > 8 else "")
        )
    for ours, ps in parts.items():
        if len(ps) != n_parts[ours]:
            names = ["q_proj", "k_proj", "v_proj"] if n_parts[ours] == 3 else ["gate_proj", "up_proj"]
            miss = [names[i] for i in range(n_parts[ours]) if i not in ps]
            raise ModelLoadError(f"missing tensor(s) for {ours} in {path}: {', '.join(miss)}")
        out[ours] = torch.cat([ps[i] for i in range(n_parts[ours])], dim=0)
        del ps
    missing = [k for k in expected if k not in out]
    if missing:
        raise ModelLoadError(
            f"missing tensor(s) in checkpoint {path}: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
        )
    for k, shape in expected.items():
        if tuple(out[k].shape) != shape:
            raise ModelLoadError(
                f"tensor {k} in {path} has shape {tuple(out[k].shape)}, expected {shape} from config.json"
            )
    return out
