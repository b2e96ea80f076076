"""Checks of an OpenAI request body that need no tokenizer: the server's `Limits` (counts and
lengths, so an oversized request is refused before it is tokenized) and well-formed Unicode."""
from __future__ import annotations

import dataclasses
from typing import List, Optional

from ...errors import ConfigError


@dataclasses.dataclass
class Limits:
    """The server's bounds on one request (`serve` flags); None: no bound."""
    max_n: Optional[int] = None           # --max-n
    max_mcmc_steps: Optional[int] = None  # --max-mcmc-steps
    max_chains: Optional[int] = None      # --max-pending: prompts x n
    token_chars: Optional[int] = None     # characters of the longest vocabulary entry (`max_token_chars`)


def max_token_chars(tokenizer) -> Optional[int]:
    """Characters of the longest vocabulary entry, so a text of c characters needs at least c / this
    tokens (byte-level BPE entries spell bytes, sentencepiece's "\u2581" one space: never fewer
    characters than the text they decode to). None when the tokenizer has no vocabulary to read."""
    try:
        return max((len(k) for k in tokenizer.get_vocab()), default=0) or None
    except Exception:
        return None


def check_unicode(body) -> None:
    """ConfigError if a string anywhere in the parsed JSON holds a lone UTF-16 surrogate (JSON's
    "\\ud800" parses to one; no tokenizer or UTF-8 encoder takes it). Iterative: any depth."""
    stack = [body]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            check_text(x, "a string in the request")
        elif isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def check_text(x: str, what: str) -> None:
    if not x.isascii():
        try:
            x.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ConfigError(f"{what} holds a lone UTF-16 surrogate ({ascii(x[e.start])} at character {e.start}); "
                              "send valid Unicode text") from None


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_limits(body: dict, chat: bool, context: int, lim: Limits) -> None:
    """The server's limits and the context, from counts and lengths alone (before tokenizing)."""
    n = body.get("n")
    n = 1 if n is None else n if is_int(n) else None  # not an int: SamplingParams names the problem
    if lim.max_n is not None and n is not None and n > lim.max_n:
        raise ConfigError(f"n={n} is more than this server's --max-n {lim.max_n}")
    steps = body.get("mcmc_steps")
    if lim.max_mcmc_steps is not None and is_int(steps) and steps > lim.max_mcmc_steps:
        raise ConfigError(f"mcmc_steps={steps} is more than this server's --max-mcmc-steps {lim.max_mcmc_steps}")
    if chat:
        msgs = body.get("messages")
        msgs = msgs if isinstance(msgs, list) else []
        if len(msgs) > context:  # every message adds at least one token
            raise ConfigError(f"{len(msgs)} messages cannot fit the context of {context} tokens")
        texts = [sum(len(x) for x in _texts(m.get("content"))) for m in msgs if isinstance(m, dict)]
        count, texts = 1, [sum(texts)]
    else:
        p = body.get("prompt")
        p = [p] if isinstance(p, str) or (isinstance(p, list) and p and all(is_int(x) for x in p)) else p
        count = len(p) if isinstance(p, list) else 1
        texts = [len(x) for x in p if isinstance(x, str)] if isinstance(p, list) else []
    if lim.max_chains is not None and n is not None and count * n > lim.max_chains:
        raise ConfigError(f"this request asks for {count * n} chains (prompts x n), more than the server's "
                          f"--max-pending {lim.max_chains}")
    if lim.token_chars:
        cap = context * lim.token_chars
        for i, c in enumerate(texts):
            if c > cap:
                raise ConfigError(f"{'the messages have' if chat else f'prompt {i} has'} {c} characters, more than "
                                  f"the context of {context} tokens can hold ({cap}: {lim.token_chars} characters, "
                                  "the longest token, per token)")


def _texts(c) -> List[str]:
    if isinstance(c, str):
        return [c]
    return [x["text"] for x in c if isinstance(x, dict) and isinstance(x.get("text"), str)] if isinstance(c, list) else []
