"""Request schemas of `serve` for /openapi.json (pydantic models; schema tools and client generators
read them). Documentation only: the routes parse bodies themselves (openai_protocol), so extra
fields stay allowed and the error messages are the Python API's."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.json_schema import models_json_schema

from ...sampling_params import METHODS, SamplingParams


class StreamOptions(BaseModel):
    include_usage: Optional[bool] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, List[Dict[str, Any]]] = Field(description="text, or a list of {\"type\": \"text\", \"text\": ...} parts")


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=0, description="token budget per sample (default 3072); cut to what "
                                      "the context leaves after each prompt; 0 only with echo (scores the prompt)")
    temperature: Optional[float] = Field(None, ge=0, description="sampling temperature of method 'plain' (0: greedy; "
                                         "the power samplers ignore it)")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="nucleus sampling, method 'plain' only")
    n: Optional[int] = Field(None, ge=1, description="samples per prompt (at most the server's --max-n)")
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, List[str], None] = Field(None, description="stop strings: plain stops at one, the power samplers "
                                              "treat one like EOS (docs/ALGORITHM.md)")
    seed: Optional[int] = Field(None, description="a prompt's samples depend on (seed, prompt, sample, parameters) only")


def _sampling_fields() -> dict:
    """SamplingParams' fields (the method's parameters, vLLM-style extra body fields), all optional."""
    hints = typing.get_type_hints(SamplingParams)
    skip = set(_Common.model_fields) | {"max_new_tokens", "logprobs", "prompt_logprobs"}
    out = {}
    for f in dataclasses.fields(SamplingParams):
        if f.name in skip:
            continue
        t = Literal[METHODS] if f.name == "method" else hints[f.name]
        out[f.name] = (Optional[t], Field(None, description=f"SamplingParams.{f.name} (default {f.default!r})"))
    return out


CompletionRequest = create_model("CompletionRequest", __base__=_Common, prompt=(
    Union[str, List[str], List[int], List[List[int]]], Field(description="text, texts, or token ids")),
    logprobs=(Optional[int], Field(None, ge=0, le=20, description="N: each token's log-prob and the N most likely")),
    echo=(Optional[bool], Field(None, description="the prompt first, with its log-probs (with logprobs)")),
    **_sampling_fields())
ChatCompletionRequest = create_model("ChatCompletionRequest", __base__=_Common, messages=(List[ChatMessage], ...),
                                     max_completion_tokens=(Optional[int], None),
                                     logprobs=(Optional[bool], None), top_logprobs=(Optional[int], Field(None, ge=0, le=20)),
                                     **_sampling_fields())


def body(model) -> dict:
    """`openapi_extra` of a route whose JSON body is `model` (see `install`)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def install(app) -> None:
    """Make app.openapi() carry the request models in components.schemas (the routes point there)."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in (CompletionRequest, ChatCompletionRequest)],
                                         ref_template="#/components/schemas/{model}")
            doc.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
