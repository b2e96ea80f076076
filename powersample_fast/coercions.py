"""Numbers and text as `SamplingParams` and the entry points accept them: integers and reals of any
kind (numpy scalars, 0-d tensors) as Python int / float with bools rejected, and text that UTF-8 can
encode."""
from __future__ import annotations

import numbers
import operator
from typing import Optional

from .errors import ConfigError


def _is_bool(x) -> bool:
    """Python, numpy and torch booleans (which are ints to Python but never a count or a rate)."""
    return isinstance(x, bool) or str(getattr(x, "dtype", "")) in ("bool", "torch.bool")


def as_int(x) -> Optional[int]:
    """int(x) for an integer of any kind (int, numpy integer, 0-d integer tensor: anything with
    __index__), None for everything else, bools included."""
    if _is_bool(x):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def as_real(x) -> Optional[float]:
    """float(x) for a real number (int, float, numpy scalar), None for everything else, bools included."""
    if _is_bool(x):
        return None
    if isinstance(x, numbers.Real):
        return float(x)
    i = as_int(x)
    return None if i is None else float(i)


def check_text(text: str, what: str) -> str:
    """`text` unchanged if it is valid Unicode that UTF-8 can encode; else a ConfigError naming `what`
    and the position (a lone surrogate such as '\\ud800' from JSON, or undecodable argv bytes that
    Python keeps as surrogate escapes), instead of the tokenizer's TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{what} is not valid text: {e.reason} {text[e.start:e.end]!r} at character {e.start}; "
                          "send UTF-8 text without lone surrogates") from None
    return text
