"""`serve`'s tokenizer routes, as vLLM serves them, each with and without the `/v1` prefix; with
them lm-eval's `local-completions` detects the remote tokenizer (`tokenizer_backend` auto) and
needs no HF hub.

- `GET /tokenizer_info` -> the tokenizer's special tokens (`eos_token`, `bos_token`, `pad_token`,
  `unk_token` and their ids), `chat_template`, `model_max_length` (the served context),
  `tokenizer_class`, `vocab_size`.
- `POST /tokenize` `{"prompt": str, "add_special_tokens": true}` or `{"messages": [...],
  "add_generation_prompt": true, "continue_final_message": false, "add_special_tokens": false}`
  (+ `"return_token_strs": true`) -> `{"tokens", "count", "max_model_len", "token_strs"}`.
  Messages go through the model's chat template as chat completions do.
- `POST /detokenize` `{"tokens": [int]}` -> `{"prompt": str}` (special tokens kept, spaces as
  they are: `detokenize(tokenize(x)) == x` for a lossless tokenizer).

Bodies are parsed and (de)tokenized on the server's worker thread, never on the event loop; the
guards (API key, body size, JSON) apply as to every route.
"""
import json  # (no `from __future__ import annotations`: FastAPI reads the routes' Request annotation)

from ...errors import ConfigError
from .guards import error_response
from .limits import check_unicode, is_int
from .protocol import ROLES, _template_why, _text_content


def install(app, tokenizer, context: int, run_blocking) -> None:
    """Add the routes to `app`. run_blocking(fn, *args): awaitable running fn on the worker thread."""
    from fastapi import Request  # the server's optional dependency: imported when a server is built

    def info() -> dict:
        out = {"tokenizer_class": type(tokenizer).__name__, "model_max_length": context, "max_model_len": context,
               "vocab_size": len(tokenizer), "chat_template": getattr(tokenizer, "chat_template", None)}
        for name in ("eos", "bos", "pad", "unk"):
            tok = getattr(tokenizer, f"{name}_token", None)
            out[f"{name}_token"] = tok if isinstance(tok, str) else None
            out[f"{name}_token_id"] = getattr(tokenizer, f"{name}_token_id", None)
        return out

    def body_of(raw: bytes) -> dict:
        try:
            body = json.loads(raw or b"null")
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ConfigError("the request body must be a JSON object")
        check_unicode(body)
        return body

    def flag(body, name, default) -> bool:
        v = body.get(name, default)
        if not isinstance(v, bool):
            raise ConfigError(f"'{name}' must be true or false (got {v!r})")
        return v

    def tokenize(raw: bytes) -> dict:
        body = body_of(raw)
        if ("prompt" in body) == ("messages" in body):
            raise ConfigError("give exactly one of 'prompt' (a string) and 'messages' (chat messages)")
        if "prompt" in body:
            p = body["prompt"]
            if not isinstance(p, str):
                raise ConfigError(f"'prompt' must be a string (got {type(p).__name__})")
            ids = tokenizer.encode(p, add_special_tokens=flag(body, "add_special_tokens", True))
        else:
            msgs = body["messages"]
            if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
                raise ConfigError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
            for i, m in enumerate(msgs):
                if m["role"] not in ROLES:
                    raise ConfigError(f"message {i} has role {m['role']!r}; a role is one of {', '.join(ROLES)}")
            msgs = [dict(m, content=_text_content(m.get("content"), i)) for i, m in enumerate(msgs)]
            if getattr(tokenizer, "chat_template", None) is None:
                raise ConfigError("this model's tokenizer has no chat template; tokenize a 'prompt'")
            gen, cont = flag(body, "add_generation_prompt", True), flag(body, "continue_final_message", False)
            if gen and cont:
                raise ConfigError("'add_generation_prompt' and 'continue_final_message' cannot both be true")
            try:
                text = tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, continue_final_message=cont,
                                                     tokenize=False)
            except Exception as e:
                raise ConfigError(f"cannot apply the model's chat template to these messages{_template_why(e)}") from None
            ids = tokenizer.encode(text, add_special_tokens=flag(body, "add_special_tokens", False))
        ids = [int(x) for x in ids]
        out = {"count": len(ids), "max_model_len": context, "tokens": ids, "token_strs": None}
        if flag(body, "return_token_strs", False):
            out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
        return out

    def detokenize(raw: bytes) -> dict:
        body = body_of(raw)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(is_int(x) for x in ids):
            raise ConfigError("'tokens' must be a list of token ids")
        bad = [x for x in ids if not 0 <= x < len(tokenizer)]
        if bad:
            raise ConfigError(f"token id(s) outside the vocabulary [0, {len(tokenizer)}): {bad[:5]}")
        return {"prompt": tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)}

    async def call(fn, request: Request):
        try:
            return await run_blocking(fn, await request.body())
        except ConfigError as e:
            return error_response(400, str(e))
        except (ValueError, TypeError, RecursionError) as e:
            return error_response(400, f"invalid request ({type(e).__name__}: {e})")

    for prefix in ("", "/v1"):
        app.add_api_route(f"{prefix}/tokenizer_info", _get(info), methods=["GET"])
        app.add_api_route(f"{prefix}/tokenize", _post(call, tokenize), methods=["POST"])
        app.add_api_route(f"{prefix}/detokenize", _post(call, detokenize), methods=["POST"])


def _get(fn):
    async def route():
        return fn()

    return route


def _post(call, fn):
    from fastapi import Request

    async def route(request: Request):
        return await call(fn, request)

    return route
