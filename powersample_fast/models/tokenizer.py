"""The tokenizer of a model directory (`load_tokenizer`), and the EOS ids a model stops at: merged
from config.json, generation_config.json and the tokenizer (`merge_eos_ids`), as one set (`eos_set`)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import FrozenSet, Iterable, List, Optional, Tuple, Union

from ..errors import ModelLoadError


def merge_eos_ids(*sources) -> Tuple[int, ...]:
    """EOS ids from several sources (each None, an int, or a list of ints), deduplicated in order."""
    out: List[int] = []
    for src in sources:
        for e in ([] if src is None else [src] if isinstance(src, int) else list(src)):
            if e is not None and int(e) not in out:
                out.append(int(e))
    return tuple(out)


def eos_set(model_eos_ids: Iterable[int], override: Optional[Iterable[int]] = None) -> FrozenSet[int]:
    """The token ids that end a sequence: `override` when given (a caller's eos_token_ids), else the
    model's (config + generation_config + tokenizer, see `merge_eos_ids`)."""
    return frozenset(int(e) for e in (override if override is not None else model_eos_ids))


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


def attach_tokenizer_eos(model, tok) -> None:
    """Add the tokenizer's EOS id to the model's EOS ids (config + generation_config)."""
    if tok is not None:
        model.config.eos_token_ids = merge_eos_ids(model.config.eos_token_ids, tok.eos_token_id)
