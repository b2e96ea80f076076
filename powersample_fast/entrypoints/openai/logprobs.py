"""Log-probs in `serve`'s OpenAI responses: the request fields (`logprobs`, `top_logprobs`, `echo`)
and the response objects, OpenAI's shapes as vLLM serves them.

- Completions, `logprobs: N` (0..20): each choice's `logprobs` is the legacy object
  `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`; `top_logprobs[i]` maps the token
  strings of position i's N most likely tokens to their log-probs, plus the chosen token's (as
  vLLM: N + 1 entries when it is not among the N). `echo: true` puts the prompt first: its text
  before the completion's, its tokens with their log-probs (the first one `null`), from the
  prefill (`SamplingParams.prompt_logprobs`). `max_tokens: 0` with `echo` scores the prompt only
  (one token is decoded with `plain` and dropped).
- Chat, `logprobs: true` (+ `top_logprobs: N`): `logprobs.content` = one
  `{"token", "logprob", "bytes", "top_logprobs": [N x {"token", "logprob", "bytes"}]}` per token.

Values: the base model's log-probs at temperature 1 (docs/ALGORITHM.md "Log-probs returned to
clients"). A token string is `tokenizer.decode([id])` (special tokens kept; a piece of a UTF-8
character reads "\\ufffd", its `bytes` are then the replacement character's). -inf is sent as
-9999.0 (JSON has no infinities), as vLLM does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional

from ...errors import ConfigError
from ...sampling_params import MAX_LOGPROBS
from .limits import is_int

FLOOR = -9999.0


@dataclasses.dataclass
class LogprobFields:
    logprobs: Optional[int] = None         # N per generated token (None: no log-probs)
    prompt_logprobs: Optional[int] = None  # N per prompt token (echo with logprobs)
    echo: bool = False                     # completions: the prompt comes first in text (and logprobs)


def parse_fields(body: dict, chat: bool) -> LogprobFields:
    """The OpenAI log-prob fields of a request body; ConfigError names the field."""
    if "prompt_logprobs" in body and body["prompt_logprobs"] is not None:
        raise ConfigError("'prompt_logprobs' is not a request field here; completions return the prompt's "
                          "log-probs with echo=true and logprobs=N")
    if chat:
        lp, top = body.get("logprobs"), body.get("top_logprobs")
        if "echo" in body and body["echo"] not in (None, False):
            raise ConfigError("'echo' is a completions field; chat completions do not echo the messages")
        if lp is not None and not isinstance(lp, bool):
            raise ConfigError(f"'logprobs' must be true or false in chat completions (got {lp!r}); "
                              "the number of alternatives is 'top_logprobs'")
        if top is not None and (not is_int(top) or not 0 <= top <= MAX_LOGPROBS):
            raise ConfigError(f"'top_logprobs' must be an integer in 0..{MAX_LOGPROBS} (got {top!r})")
        if top and not lp:
            raise ConfigError("'top_logprobs' needs 'logprobs': true")
        return LogprobFields(logprobs=(top or 0) if lp else None)
    lp, echo = body.get("logprobs"), body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise ConfigError(f"'echo' must be true or false (got {echo!r})")
    if lp is not None and (not is_int(lp) or not 0 <= lp <= MAX_LOGPROBS):
        raise ConfigError(f"'logprobs' must be an integer in 0..{MAX_LOGPROBS} (got {lp!r}): the number of "
                          "most likely tokens returned per position")
    return LogprobFields(logprobs=lp, prompt_logprobs=lp if echo and lp is not None else None, echo=bool(echo))


class TokenText:
    """Token id -> its string, cached (one decode per distinct id)."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.cache[i] = self.tok.decode([int(i)], skip_special_tokens=False)
        return s


def _num(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return max(float(v), FLOOR)


def _top_dict(text: TokenText, top, chosen: Optional[int] = None, own=None) -> dict:
    d = {}
    for i, v in top:
        d.setdefault(text(i), _num(v))
    if chosen is not None and text(chosen) not in d:
        d[text(chosen)] = _num(own)
    return d


def legacy(text: TokenText, ids: List[int], entries: list, offset0: int = 0) -> dict:
    """Completions' logprobs object for tokens `ids` with `entries` [(own, [(id, lp)])] or None
    (a prompt's first token); text offsets start at offset0."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = offset0
    for i, e in zip(ids, entries):
        s = text(i)
        out["tokens"].append(s)
        out["text_offset"].append(pos)
        pos += len(s)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
        else:
            out["token_logprobs"].append(_num(e[0]))
            out["top_logprobs"].append(_top_dict(text, e[1], i, e[0]))
    return out


def merge(a: Optional[dict], b: dict) -> dict:
    """Two legacy objects, one after the other."""
    if a is None:
        return b
    return {k: a[k] + b[k] for k in a}


def chat_content(text: TokenText, ids: List[int], entries: list) -> list:
    def item(i, v):
        s = text(i)
        return {"token": s, "logprob": _num(v), "bytes": list(s.encode("utf-8"))}

    return [dict(item(i, e[0]), top_logprobs=[item(j, v) for j, v in e[1]]) for i, e in zip(ids, entries)]


def result_entries(r, n: int) -> list:
    """A SampleResult's per-token entries [(own, top-n)] (SamplingParams.logprobs was set)."""
    own = r.token_logprobs if r.token_logprobs is not None else r.logp
    top = r.top_logprobs if r.top_logprobs is not None else [[] for _ in own]
    return [(o, t[:n]) for o, t in zip(own, top)]


class Annotator:
    """Echo and log-probs for the choices of one request (`Parsed` req), JSON and streamed."""

    def __init__(self, tokenizer, req):
        self.tok, self.req = tokenizer, req
        self.text = TokenText(tokenizer)
        self.n = req.params.logprobs  # None: no log-probs

    def prompt_text(self, i: int) -> str:
        t = self.req.texts[i] if self.req.texts else None
        return t if t is not None else self.tok.decode(self.req.prompts[i], skip_special_tokens=False)

    def _prompt_part(self, i: int, prompt_entries) -> Optional[dict]:
        if self.n is None or not prompt_entries:
            return None
        return legacy(self.text, self.req.prompts[i], prompt_entries, 0)

    def gen(self, r):
        """(token ids, entries) of a result's generated tokens that are returned."""
        if self.req.score_only or self.n is None:
            return [], []
        return list(r.token_ids), result_entries(r, self.n)

    def complete(self, c: dict, chat: bool, i: int, r, prompt_entries) -> dict:
        """A finished choice (JSON response): echo and logprobs added to `c` (openai_shapes.choice)."""
        if chat:
            if self.n is not None:
                c["logprobs"] = {"content": chat_content(self.text, *self.gen(r))}
            return c
        prefix = self.prompt_text(i) if self.req.echo else ""
        if self.req.score_only:
            c["text"] = ""
        c["text"] = prefix + c["text"]
        if self.n is not None:
            ids, entries = self.gen(r)
            obj = legacy(self.text, ids, entries, len(prefix))
            c["logprobs"] = merge(self._prompt_part(i, prompt_entries) if self.req.echo else None, obj)
        return c

    def stream(self, c: dict, chat: bool, i: int, s: "StreamState", prompt_entries, ids, entries) -> dict:
        """A streamed chunk of choice `c` carrying tokens `ids` (their `entries`): the echoed prompt
        goes first, once per choice."""
        if self.req.score_only:
            ids, entries = [], []
        if chat:
            if self.n is not None:
                c["logprobs"] = {"content": chat_content(self.text, ids, entries)}
            return c
        prompt = None
        if self.req.echo and not s.echoed:
            s.echoed = True
            prefix = self.prompt_text(i)
            c["text"] = prefix + ("" if self.req.score_only else c["text"])
            s.offset += len(prefix)
            prompt = self._prompt_part(i, prompt_entries)
        elif self.req.score_only:
            c["text"] = ""
        if self.n is not None:
            c["logprobs"] = merge(prompt, legacy(self.text, ids, entries, s.offset))
        s.offset += sum(len(self.text(t)) for t in ids)
        return c


class StreamState:
    """A streamed choice: tokens whose log-probs are not sent yet, how many were, the text offset."""

    def __init__(self):
        self.ids, self.entries, self.sent, self.offset, self.echoed = [], [], 0, 0, False

    def add(self, ids, entries):
        self.ids += list(ids)
        self.entries += list(entries or [])

    def take(self):
        out = self.ids, self.entries
        self.sent += len(self.ids)
        self.ids, self.entries = [], []
        return out
