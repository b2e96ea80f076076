"""OpenAI request parsing and response shapes for `powersample-fast serve` (no web framework here).

A request body becomes token-id prompts plus one `SamplingParams`; the method's parameters come in as
extra body fields (vLLM's "extra sampling parameters"), and `max_tokens` is the budget. Every bad
input raises `ConfigError` with the message the Python API gives, which the server turns into a 400.
"""
from __future__ import annotations

import dataclasses
import difflib
import time
import uuid
from typing import List, Optional

from .errors import ConfigError

# OpenAI fields this server cannot honour: refused unless they hold their neutral value
_NEUTRAL = {"top_p": (None, 1, 1.0), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
            "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "logit_bias": (None, {}),
            "suffix": (None, ""), "tools": (None, []), "response_format": (None, {"type": "text"})}
_WHY = {"top_p": "power sampling has no nucleus truncation; use top_k",
        "logprobs": "per-token log-probs are not returned in OpenAI form (each choice's power_sample.logp_sum is)",
        "echo": "the server only returns generated text", "tools": "tool calling is not supported"}


@dataclasses.dataclass
class Parsed:
    prompts: List[List[int]]
    params: object  # SamplingParams
    stream: bool = False
    include_usage: bool = False
    stop: List[str] = dataclasses.field(default_factory=list)


def _field_names(param_cls):
    return {f.name for f in dataclasses.fields(param_cls)}


def _encode_prompts(body: dict, chat: bool, tokenizer) -> List[List[int]]:
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
            raise ConfigError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
        msgs = [dict(m, content=_text_content(m.get("content"))) for m in msgs]
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("this model's tokenizer has no chat template; use /v1/completions")
        try:
            ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # jinja errors (e.g. a template that rejects a role)
            raise ConfigError(f"cannot apply the model's chat template to these messages: {e}") from e
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [[int(x) for x in ids]]
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(x, int) for x in p)):
        p = [p]
    if not isinstance(p, list) or not p:
        raise ConfigError("'prompt' must be a string, a list of strings, or token ids (got "
                          f"{'nothing' if p is None else type(p).__name__ if not isinstance(p, list) else 'an empty list'})")
    out = []
    for i, x in enumerate(p):
        if isinstance(x, str):
            if not x:
                raise ConfigError(f"prompt {i} is empty; give at least one character or token")
            out.append([int(t) for t in tokenizer.encode(x, add_special_tokens=True)])
        elif isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            out.append(list(x))
        else:
            raise ConfigError(f"prompt {i} must be a non-empty string or list of token ids")
    return out


def _text_content(c):
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # [{"type": "text", "text": ...}, ...]
        if all(isinstance(x, dict) and x.get("type") == "text" for x in c):
            return "".join(str(x.get("text", "")) for x in c)
        raise ConfigError("message content parts other than text are not supported")
    raise ConfigError(f"message content must be a string or a list of text parts (got {type(c).__name__})")


def parse_request(body, *, chat: bool, tokenizer, context: int, param_cls) -> Parsed:
    """Validate an OpenAI (chat) completion body. Raises ConfigError."""
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object")
    names = _field_names(param_cls)
    for k, v in body.items():
        if k in _NEUTRAL and v not in _NEUTRAL[k]:
            raise ConfigError(f"{k}={v!r} is not supported" + (f": {_WHY[k]}" if k in _WHY else ""))
        if k not in names and k not in _KNOWN:
            close = difflib.get_close_matches(k, sorted(names), n=1, cutoff=0.8)
            if close:
                raise ConfigError(f"unknown parameter {k!r}; did you mean {close[0]!r}?")
    prompts = _encode_prompts(body, chat, tokenizer)
    kw = {k: body[k] for k in names if k in body and body[k] is not None}
    budget = [body[k] for k in ("max_tokens", "max_completion_tokens") if body.get(k) is not None]
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
        if not isinstance(temp, (int, float)) or temp <= 0:
            raise ConfigError(f"temperature must be > 0 (got {temp!r}): this server samples, it has no greedy mode")
        kw["proposal_temperature"] = temp  # plain sampling: proposal_temperature is the sampling temperature
    best_of = body.get("best_of")
    if best_of is not None and best_of != kw.get("n", 1):
        raise ConfigError("best_of is not supported (every sample is returned); use n")
    params = param_cls(**kw)  # validates: the Python API's messages
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ConfigError("'stop' must be a non-empty string or a list of them")
    opts = body.get("stream_options") or {}
    return Parsed(prompts, params, stream=bool(body.get("stream", False)),
                  include_usage=bool(isinstance(opts, dict) and opts.get("include_usage")), stop=stop)


# fields of OpenAI's request schemas that are accepted (and ignored when neutral)
_KNOWN = set(_NEUTRAL) | {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
                          "n", "stream", "stream_options", "stop", "seed", "best_of", "user", "tool_choice",
                          "parallel_tool_calls", "metadata", "store", "service_tier", "reasoning_effort"}


def apply_stop(text: str, stop: List[str]):
    """(text cut before the first stop string, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class TextStream:
    """Incremental detokenisation of one choice, with stop strings held back until they resolve."""

    def __init__(self, tokenizer, stop: List[str]):
        self.tok, self.stop, self.ids, self.sent, self.stopped = tokenizer, stop, [], "", False
        self.chunks = 0  # deltas sent
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, ids) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        text, self.stopped = apply_stop(text, self.stop)
        safe = text if self.stopped else text[:max(len(self.sent), len(text) - self.hold)]
        return self._emit(safe)

    def finish(self, final_text: str) -> str:
        """The rest of the final text (after stop strings); '' if a stop string ended it already."""
        return "" if self.stopped and self.sent else self._emit(final_text)

    def _emit(self, text: str) -> str:
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        self.chunks += bool(delta)
        return delta


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def choice_extra(r) -> dict:
    """What a choice carries besides the OpenAI fields."""
    return {"power_sample": {"method": getattr(r, "method", None), "accepted": r.accepted, "proposed": r.proposed, "finished_by_eos": r.finished_by_eos,
                             "logp_sum": float(sum(r.logp)), "num_tokens": len(r.token_ids), "stats": r.stats}}


def response(kind: str, rid: str, model: str, choices: list, usage: Optional[dict]) -> dict:
    obj = {"completion": "text_completion", "chat": "chat.completion",
           "completion_chunk": "text_completion", "chat_chunk": "chat.completion.chunk"}[kind]
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None or not kind.endswith("chunk"):
        out["usage"] = usage
    return out


def choice(chat: bool, index: int, text: Optional[str], finish: Optional[str], chunk: bool = False,
           first: bool = True) -> dict:
    if not chat:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    if chunk:  # the role goes in a choice's first delta only, as OpenAI does
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish}


def usage(prompts: List[List[int]], completion_tokens: int) -> dict:
    p = sum(len(x) for x in prompts)
    return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens}
