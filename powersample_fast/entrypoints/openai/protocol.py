"""OpenAI request parsing for `powersample-fast serve` (no web framework here; the response shapes
are in shapes.py).

A request body becomes token-id prompts plus one `SamplingParams`; the method's parameters come in as
extra body fields (vLLM's "extra sampling parameters"), and `max_tokens` is the budget. Every bad
input raises `ConfigError` with the message the Python API gives, which the server turns into a 400.
The cheap checks (types, counts, lengths, the server's `Limits`) run before any tokenization, so an
oversized request is refused without being tokenized.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import List, Optional

from ...errors import ConfigError
from .limits import Limits, check_limits, check_text, is_int, max_token_chars, check_unicode  # noqa: F401
from .shapes import TextStream, apply_stop, choice, choice_extra, new_id, response, usage  # noqa: F401
from .logprobs import parse_fields

ROLES = ("system", "user", "assistant", "tool", "developer")
# OpenAI fields this server cannot honour: refused unless they hold their neutral value
_NEUTRAL = {"presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
            "suffix": (None, ""), "tools": (None, []), "response_format": (None, {"type": "text"})}
_WHY = {"tools": "tool calling is not supported"}
_INT_FIELDS = ("max_tokens", "max_completion_tokens", "best_of")  # besides SamplingParams' int fields


@dataclasses.dataclass
class Parsed:
    prompts: List[List[int]]
    params: object  # SamplingParams
    stream: bool = False
    include_usage: bool = False
    stop: List[str] = dataclasses.field(default_factory=list)
    # per prompt: its own SamplingParams when max_tokens was cut to the context for it (else params)
    prompt_params: Optional[list] = None
    max_tokens: Optional[int] = None  # the budget asked (max_tokens / max_completion_tokens)
    echo: bool = False                # completions: the prompt comes first (logprobs.py)
    score_only: bool = False          # echo with max_tokens 0: the one decoded token is dropped
    texts: Optional[list] = None      # the prompts as given (str) or None (token ids), for echo

    def params_for(self, i: int):
        return self.prompt_params[i] if self.prompt_params else self.params


def _field_names(param_cls):
    return {f.name for f in dataclasses.fields(param_cls)}


@functools.lru_cache(maxsize=None)
def _int_fields(param_cls) -> frozenset:
    hints = typing.get_type_hints(param_cls)
    return frozenset(k for k, t in hints.items() if t in (int, Optional[int])) | frozenset(_INT_FIELDS)


def _normalize(body: dict, param_cls) -> dict:
    """Integral floats in integer fields become ints (`max_tokens: 1.0`, as pydantic servers take);
    `stream` and `stream_options.include_usage` must be JSON booleans."""
    out = dict(body)
    for k in _int_fields(param_cls):
        v = out.get(k)
        if isinstance(v, float) and v.is_integer():
            out[k] = int(v)
    opts = out.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ConfigError(f"'stream_options' must be an object (got {type(opts).__name__})")
    for name, v in (("stream", out.get("stream")), ("stream_options.include_usage", (opts or {}).get("include_usage"))):
        if v is not None and not isinstance(v, bool):
            raise ConfigError(f"'{name}' must be true or false (got {v!r})")
    return out


def _encode_prompts(body: dict, chat: bool, tokenizer) -> List[List[int]]:
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise ConfigError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
        for i, m in enumerate(msgs):
            if not isinstance(m["role"], str) or m["role"] not in ROLES:
                raise ConfigError(f"message {i} has role {_short(m['role'])}; a role is one of {', '.join(ROLES)}")
        msgs = [dict(m, content=_text_content(m.get("content"), i)) for i, m in enumerate(msgs)]
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("this model's tokenizer has no chat template; use /v1/completions")
        try:
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as e:
            raise ConfigError(f"cannot apply the model's chat template to these messages{_template_why(e)}") from None
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [[int(x) for x in ids]]
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and all(is_int(x) for x in p)):
        p = [p]
    if not isinstance(p, list) or not p:
        raise ConfigError("'prompt' must be a string, a list of strings, or token ids (got "
                          f"{'nothing' if p is None else type(p).__name__ if not isinstance(p, list) else 'an empty list'})")
    out = []
    for i, x in enumerate(p):
        if isinstance(x, str):
            if not x:
                raise ConfigError(f"prompt {i} is empty; give at least one character or token")
            check_text(x, f"prompt {i}")
            out.append([int(t) for t in tokenizer.encode(x, add_special_tokens=True)])
        elif isinstance(x, list) and x and all(is_int(t) for t in x):
            out.append(list(x))
        else:
            raise ConfigError(f"prompt {i} must be a non-empty string or list of token ids")
    return out


def _template_why(e: Exception) -> str:
    """A template's own message (jinja `raise_exception`: "roles must alternate ...", its first line);
    for anything else only the error's type, not tokenizer internals."""
    try:
        from jinja2 import TemplateError
    except ImportError:  # pragma: no cover - transformers needs jinja2 for chat templates
        TemplateError = ()
    if isinstance(e, TemplateError) and str(e).strip():
        return ": " + str(e).strip().splitlines()[0][:200]
    return f" ({type(e).__name__})"


def _short(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _text_content(c, i: int = 0):
    if isinstance(c, str):
        check_text(c, f"message {i}")
        return c
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        if all(isinstance(x, dict) and x.get("type") == "text" for x in c):
            text = "".join(str(x.get("text", "")) for x in c)
            check_text(text, f"message {i}")
            return text
        raise ConfigError("message content parts other than text are not supported")
    raise ConfigError(f"message content must be a string or a list of text parts (got {type(c).__name__})")


def parse_request(body, *, chat: bool, tokenizer, context: int, param_cls, limits: Optional[Limits] = None) -> Parsed:
    """Validate an OpenAI (chat) completion body. Raises ConfigError."""
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object")
    names = _field_names(param_cls)
    for k, v in body.items():
        if k in _NEUTRAL and v not in _NEUTRAL[k]:
            raise ConfigError(f"{k}={_short(v)} is not supported" + (f": {_WHY[k]}" if k in _WHY else ""))
        if k not in names and k not in _KNOWN:
            close = difflib.get_close_matches(k, sorted(names), n=1, cutoff=0.8)
            if close:
                raise ConfigError(f"unknown parameter {_short(k)}; did you mean {close[0]!r}?")
    body = _normalize(body, param_cls)
    check_limits(body, chat, context, limits or Limits())
    prompts = _encode_prompts(body, chat, tokenizer)
    kw = {k: body[k] for k in names if k in body and body[k] is not None}
    lpf = parse_fields(body, chat)
    for k in ("logprobs", "prompt_logprobs"):  # OpenAI's fields, not SamplingParams' (logprobs.py)
        kw.pop(k, None)
    if lpf.logprobs is not None:
        kw["logprobs"] = lpf.logprobs
    if lpf.prompt_logprobs is not None:
        kw["prompt_logprobs"] = lpf.prompt_logprobs
    budget = [body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
    score_only = bool(budget) and budget[0] == 0 and lpf.echo
    if score_only:  # echo scores the prompt; one plain token is decoded and dropped
        budget = [1]
        kw["method"] = "plain"
    if budget:
        if "max_new_tokens" in kw and kw["max_new_tokens"] != budget[0]:
            raise ConfigError("give the budget once: max_tokens and max_new_tokens differ")
        kw["max_new_tokens"] = budget[0]
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ConfigError(f"the prompt has {longest} tokens, which leaves no room for new tokens in the context "
                          f"of {context} tokens; shorten the prompt")
    if "max_new_tokens" not in kw:  # default: the method's budget, cut to what the context leaves
        default = next(f.default for f in dataclasses.fields(param_cls) if f.name == "max_new_tokens")
        kw["max_new_tokens"] = min(default, context - longest)
    method = kw.get("method", next(f.default for f in dataclasses.fields(param_cls) if f.name == "method"))
    temp = body.get("temperature")
    if method == "plain" and temp is not None and "proposal_temperature" not in kw:
        if not isinstance(temp, (int, float)) or isinstance(temp, bool) or temp < 0:
            raise ConfigError(f"temperature must be >= 0 (got {_short(temp)}); 0 is greedy")
        if temp == 0:  # greedy: the most likely token (top_k 1; tokens tied with it are drawn uniformly)
            kw["top_k"] = 1
        else:
            kw["proposal_temperature"] = temp  # plain sampling: proposal_temperature is the sampling temperature
    best_of = body.get("best_of")
    if best_of is not None and best_of != kw.get("n", 1):
        raise ConfigError("best_of is not supported (every sample is returned); use n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ConfigError("'stop' must be a non-empty string or a list of them")
    params = param_cls(**kw)  # validates: the Python API's messages
    # max_tokens longer than the context leaves after a prompt: cut for that prompt (finish_reason
    # "length", the choice's power_sample.max_tokens_cut_to says where)
    cut = [min(params.max_new_tokens, context - len(p)) for p in prompts]
    per = [dataclasses.replace(params, max_new_tokens=c) for c in cut] if min(cut) < params.max_new_tokens else None
    opts = body.get("stream_options") or {}
    p = body.get("prompt")
    texts = None
    if not chat:
        raw = [p] if isinstance(p, str) or (isinstance(p, list) and p and all(is_int(x) for x in p)) else p
        texts = [x if isinstance(x, str) else None for x in raw]
    return Parsed(prompts, params, stream=bool(body.get("stream", False)),
                  include_usage=bool(opts.get("include_usage")), stop=stop, prompt_params=per,
                  max_tokens=params.max_new_tokens, echo=lpf.echo, score_only=score_only, texts=texts)


# fields of OpenAI's request schemas that are accepted (and ignored when neutral)
_KNOWN = set(_NEUTRAL) | {"logprobs", "top_logprobs", "echo", "top_p",
                          "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
                          "n", "stream", "stream_options", "stop", "seed", "best_of", "user", "tool_choice",
                          "parallel_tool_calls", "metadata", "store", "service_tier", "reasoning_effort"}
