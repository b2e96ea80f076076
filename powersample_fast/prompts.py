"""Prompts: what a prompt may be (text, token ids as lists, tensors or arrays) and how it becomes
token ids (the tokenizer, with the chat template when there is one), with errors that name the input."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

from .errors import ConfigError
from .coercions import as_int, check_text

Prompt = Union[str, Sequence[int]]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat(tokenizer, chat: Optional[bool]) -> bool:
    """Whether text prompts go through the chat template: `chat` itself, or for None ("auto") whether
    the tokenizer has a template. chat=True without a template is an error."""
    if chat is None:
        return has_chat_template(tokenizer)
    if chat and tokenizer is not None and not has_chat_template(tokenizer):
        raise ConfigError("chat=True but the tokenizer has no chat template; pass chat=False (CLI: --no-chat)")
    return bool(chat)


def _describe(x) -> str:
    """Type of a prompt input for error messages, with shape and dtype for arrays and tensors."""
    name = f"{type(x).__module__.split('.')[0]}.{type(x).__name__}" if hasattr(x, "shape") else type(x).__name__
    if hasattr(x, "shape"):
        return f"{name} of shape {tuple(x.shape)}, dtype {x.dtype}"
    if isinstance(x, (list, tuple)):
        bad = next((e for e in x if as_int(e) is None), None)
        return f"{name} containing {type(bad).__name__} {bad!r}" if x and bad is not None else name
    return name


def _array_ids(x, what: str):
    """A torch tensor / numpy array of token ids -> list (1-D) or list of lists (2-D); else an error."""
    dtype = str(x.dtype)
    integer = getattr(x.dtype, "kind", None) in ("i", "u") or (
        dtype.startswith("torch.") and not x.dtype.is_floating_point and not x.dtype.is_complex
        and dtype != "torch.bool")
    if not integer or len(x.shape) not in (1, 2):
        raise ConfigError(f"{what} must be token ids as a 1-D or 2-D integer tensor/array "
                          f"(got {_describe(x)})")
    return x.tolist()


def _ids(p) -> Optional[List[int]]:
    """A list of token ids (ints of any kind, no bools), or None if `p` is not one."""
    if not isinstance(p, (list, tuple)):
        return None
    ids = [as_int(x) for x in p]
    return None if any(i is None for i in ids) else ids


def normalize_prompts(prompts, tokenizer, chat: Optional[bool] = None) -> List[List[int]]:
    """str | list[str] | list[int] | list[list[int]] | 1-D/2-D integer tensor or array -> list of
    token-id lists (validated). chat: apply the tokenizer's chat template to text prompts; None
    (default) = when the tokenizer has one (see `use_chat`)."""
    if hasattr(prompts, "shape") and hasattr(prompts, "tolist"):  # torch / numpy ids
        prompts = _array_ids(prompts, "prompts")
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, (list, tuple)) and prompts and not any(
            isinstance(x, (str, list, tuple)) or getattr(x, "ndim", 0) > 0 for x in prompts):
        if _ids(prompts) is None:  # a flat sequence of scalars: one prompt of token ids
            raise ConfigError("token ids must be integers; a prompt must be a string or a list of token ids "
                              f"(got {_describe(prompts)})")
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        got = "an empty input" if isinstance(prompts, (list, tuple)) else _describe(prompts)
        raise ConfigError(f"prompts must be a string, a list of strings, or lists of token ids (got {got})")
    chat_on = None
    out: List[List[int]] = []
    for i, p in enumerate(prompts):
        if hasattr(p, "shape") and hasattr(p, "tolist"):
            p = _array_ids(p, f"prompt {i}")
            if p and isinstance(p[0], list):
                raise ConfigError(f"prompt {i} must be a 1-D sequence of token ids (got a 2-D tensor/array)")
        if isinstance(p, str):
            if p == "":
                raise ConfigError(f"prompt {i} is empty; give at least one character or token")
            check_text(p, f"prompt {i}")
            if tokenizer is None:
                raise ConfigError("a tokenizer is needed to encode text prompts; pass token ids instead")
            if chat_on is None:
                chat_on = use_chat(tokenizer, chat)
            if chat_on:
                ids = tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
                )
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                ids = list(ids)
            else:
                ids = tokenizer.encode(p, add_special_tokens=True)
            out.append([int(x) for x in ids])
        elif _ids(p) is not None:
            if len(p) == 0:
                raise ConfigError(f"prompt {i} is an empty token list; give at least one token")
            out.append(_ids(p))
        else:
            raise ConfigError(f"prompt {i} must be a string or a list of token ids (got {_describe(p)})")
        if len(out[-1]) == 0:
            raise ConfigError(f"prompt {i} encodes to zero tokens")
    return out
