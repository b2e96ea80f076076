"""`serve` as a backend for OpenAI clients and eval harnesses (issue 23): log-probs (completions,
chat, streaming), echo scoring of prompts, tokenizer routes, stop strings that stop, max_tokens cut
to the context, greedy temperature 0, seeds. A real server in a subprocess over the tiny bigram
model of helpers/tiny_models.py (one character per token); every value is checked against a direct
computation with HF transformers on the same checkpoint (fp32)."""
import json

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from helpers.server_proc import running_server  # noqa: E402
from helpers.tiny_models import VOCAB, make_random_model_dir  # noqa: E402

pytestmark = pytest.mark.slow
ATOL = 1e-4
PLAIN = {"method": "plain"}
MH = {"mcmc_steps": 2, "block_size": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_random_model_dir(tmp_path_factory.mktemp("lpmodel") / "model", ctx=2048)


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    with running_server(tmp_path_factory.mktemp("serve-lp"), "--max-batch", 8, "--dtype", "float32",
                        model=model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def hf(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    @torch.no_grad()
    def logprobs(ids):
        return torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1)

    return logprobs


def ids_of(text):
    return [VOCAB[c] for c in text]


INV = {i: c for c, i in VOCAB.items()}


def _check_positions(hf, prompt_ids, tokens, token_lps, tops, n, chosen_in_top=True):
    """tokens (strings), their log-probs and top dicts/lists at the positions after prompt_ids."""
    full = hf(prompt_ids + ids_of("".join(tokens)))
    P = len(prompt_ids)
    for i, (t, lp, top) in enumerate(zip(tokens, token_lps, tops)):
        row = full[P - 1 + i]
        assert abs(lp - row[VOCAB[t]].item()) < ATOL
        best = row.topk(n).indices.tolist()
        expect = {INV[b]: row[b].item() for b in best}
        if chosen_in_top:
            expect.setdefault(t, row[VOCAB[t]].item())
        got = top if isinstance(top, dict) else {e.token: e.logprob for e in top}
        assert set(got) == set(expect)
        assert all(abs(got[k] - v) < ATOL for k, v in expect.items())


def test_completion_logprobs_match_a_direct_computation(server, hf):
    r = server.client.completions.create(model="tiny", prompt="hello world", max_tokens=10, logprobs=5, seed=1,
                                         extra_body=PLAIN)
    c = r.choices[0]
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text and len(lp.tokens) == 10
    assert lp.text_offset == list(range(10))
    _check_positions(hf, ids_of("hello world"), lp.tokens, lp.token_logprobs, lp.top_logprobs, 5)
    # the power samplers return base-model log-probs too (temperature 1, whatever their proposal)
    r = server.client.completions.create(model="tiny", prompt="hello world", max_tokens=8, logprobs=2, seed=1,
                                         extra_body=MH)
    lp = r.choices[0].logprobs
    _check_positions(hf, ids_of("hello world"), lp.tokens, lp.token_logprobs, lp.top_logprobs, 2)
    assert abs(sum(lp.token_logprobs) - r.choices[0].model_extra["power_sample"]["logp_sum"]) < 1e-3


@pytest.mark.parametrize("extra", [PLAIN, MH], ids=["plain", "mh"])
def test_chat_logprobs_and_streaming(server, hf, extra):
    msgs = [{"role": "user", "content": "hi there"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=9, seed=3, logprobs=True, top_logprobs=3, extra_body=extra)
    r = server.client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert "".join(e.token for e in content) == r.choices[0].message.content
    assert all(e.bytes == list(e.token.encode()) and len(e.top_logprobs) == 3 for e in content)
    prompt = ids_of("u:hi there\na:")
    _check_positions(hf, prompt, [e.token for e in content], [e.logprob for e in content],
                     [e.top_logprobs for e in content], 3, chosen_in_top=False)
    chunks = list(server.client.chat.completions.create(stream=True, **kw))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in streamed] == \
        [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in content]
    # completions stream: the chunks' legacy objects add up to the JSON response's
    ckw = dict(model="tiny", prompt="stream", max_tokens=7, seed=4, logprobs=2, extra_body=extra)
    full = server.client.completions.create(**ckw).choices[0].logprobs
    parts = [ch.choices[0].logprobs for ch in server.client.completions.create(stream=True, **ckw)
             if ch.choices and ch.choices[0].logprobs]
    assert sum((p.tokens for p in parts), []) == full.tokens
    assert sum((p.token_logprobs for p in parts), []) == full.token_logprobs
    assert sum((p.text_offset for p in parts), []) == full.text_offset


def test_echo_scores_prompts_as_lm_eval_asks(server, hf):
    """lm-eval's local-completions loglikelihood payload, quoted from its source (0.4.13,
    openai_completions.py: _create_payload with generate=False and parse_logprobs)."""
    ctx, conts = ids_of("the cat sat"), [ids_of(" on"), ids_of(" 4x")]
    prompts = [ctx + c for c in conts]
    payload = {"model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    out = httpx.post(server.url + "/v1/completions", json=payload, timeout=60).json()
    for choice, p, cont in zip(sorted(out["choices"], key=lambda c: c["index"]), prompts, conts):
        lp = choice["logprobs"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(p) + 1
        ctxlen = len(ctx)
        got = sum(lp["token_logprobs"][ctxlen:-1])
        is_greedy = all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][ctxlen:-1],
                                                                 lp["top_logprobs"][ctxlen:-1]))
        full = hf(p)
        want = sum(full[ctxlen - 1 + i, t].item() for i, t in enumerate(cont))
        assert abs(got - want) < ATOL
        assert is_greedy == all(full[ctxlen - 1 + i].argmax().item() == t for i, t in enumerate(cont))
        assert choice["text"].startswith("the cat sat")
    # a greedy continuation is reported greedy
    full = hf(ctx)
    greedy = ctx + [full[-1].argmax().item()]
    greedy.append(hf(greedy)[-1].argmax().item())
    lp = httpx.post(server.url + "/v1/completions", json=dict(payload, prompt=[greedy]), timeout=60).json()
    lp = lp["choices"][0]["logprobs"]
    assert all(t == max(top.values()) for t, top in zip(lp["token_logprobs"][len(ctx):-1], lp["top_logprobs"][len(ctx):-1]))
    # a string prompt, max_tokens 0: the prompt only, scored
    r = server.client.completions.create(model="tiny", prompt="abc d", max_tokens=0, echo=True, logprobs=0)
    c = r.choices[0]
    assert c.text == "abc d" and c.logprobs.tokens == list("abc d") and r.usage.completion_tokens == 0
    full = hf(ids_of("abc d"))
    assert all(abs(v - full[i, VOCAB["abc d"[i + 1]]].item()) < ATOL for i, v in enumerate(c.logprobs.token_logprobs[1:]))
    # streamed echo, n = 2 over two prompts: each choice's chunks add up to its JSON choice
    kw = dict(model="tiny", prompt=["ab", "xyz"], max_tokens=4, logprobs=1, echo=True, n=2, seed=1, extra_body=PLAIN)
    full = server.client.completions.create(**kw)
    chunks = [x.choices[0] for x in server.client.completions.create(stream=True, **kw) if x.choices]
    for ch in full.choices:
        parts = [p for p in chunks if p.index == ch.index]
        assert "".join(p.text for p in parts) == ch.text and ch.text.startswith(("ab", "xyz")[ch.index // 2])
        assert sum((p.logprobs.tokens for p in parts if p.logprobs), []) == ch.logprobs.tokens
        assert sum((p.logprobs.token_logprobs for p in parts if p.logprobs), []) == ch.logprobs.token_logprobs
    # echo without logprobs: the text only
    r = server.client.completions.create(model="tiny", prompt="xyz", max_tokens=2, echo=True, seed=0, extra_body=PLAIN)
    assert r.choices[0].text.startswith("xyz") and len(r.choices[0].text) == 5 and r.choices[0].logprobs is None


def test_tokenizer_routes(server):
    for prefix in ("", "/v1"):
        info = httpx.get(server.url + prefix + "/tokenizer_info", timeout=10).json()
        assert info["eos_token"] == "<eos>" and info["model_max_length"] == 2048 and "chat_template" in info
        text = "hello, world: 1+2=3?\n"
        t = httpx.post(server.url + prefix + "/tokenize", json={"prompt": text, "add_special_tokens": False},
                       timeout=10).json()
        assert t["tokens"] == ids_of(text) and t["count"] == len(text) and t["max_model_len"] == 2048
        d = httpx.post(server.url + prefix + "/detokenize", json={"tokens": t["tokens"]}, timeout=10).json()
        assert d["prompt"] == text
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        m = httpx.post(server.url + prefix + "/tokenize", json={"messages": msgs}, timeout=10).json()
        r = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1, extra_body=PLAIN)
        assert m["count"] == r.usage.prompt_tokens
        assert httpx.post(server.url + prefix + "/detokenize", json={"tokens": m["tokens"]},
                          timeout=10).json()["prompt"] == "s:be brief\nu:hi\na:"
    for route, body, match in (("/tokenize", {"prompt": 5}, "'prompt' must be a string"),
                               ("/tokenize", {}, "exactly one of 'prompt'"),
                               ("/detokenize", {"tokens": [1, 999]}, "outside the vocabulary"),
                               ("/detokenize", {"tokens": "ab"}, "'tokens' must be a list")):
        r = httpx.post(server.url + route, json=body, timeout=10)
        assert r.status_code == 400 and match in r.json()["error"]["message"], r.text
    assert httpx.post(server.url + "/tokenize", content="{}", headers={"Content-Type": "text/plain"},
                      timeout=10).status_code == 415


def test_stop_string_stops_decoding(server):
    def engine_tokens():
        return httpx.get(server.url + "/stats", timeout=10).json()["engine"]["tokens_sampled"]

    kw = dict(model="tiny", prompt="go", max_tokens=300, seed=7, extra_body=PLAIN)
    t0 = engine_tokens()
    full = server.client.completions.create(**kw).choices[0]
    t1 = engine_tokens()
    assert t1 - t0 == 300 and full.model_extra["power_sample"]["num_tokens"] == 300
    stop = full.text[5]
    cut = full.text.index(stop)
    c = server.client.completions.create(stop=[stop], **kw).choices[0]
    t2 = engine_tokens()
    assert c.text == full.text[:cut] and c.finish_reason == "stop"
    assert t2 - t1 == cut + 1 == c.model_extra["power_sample"]["stats"]["tokens_sampled"]  # the row stopped there
    assert c.model_extra["power_sample"]["finished_by_stop"]
    # a stop string spelled across tokens (one character per token here)
    two = full.text[8:10]
    c = server.client.completions.create(stop=[two], **kw).choices[0]
    assert c.text == full.text[:full.text.index(two)] and c.model_extra["power_sample"]["num_tokens"] <= 10


def test_max_tokens_cut_to_the_context_and_greedy(server, hf):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ["a" * 2040, "b"], "max_tokens": 100,
                                                         "temperature": 0, "logprobs": 1, **PLAIN}, timeout=60).json()
    long, short = r["choices"]
    assert long["finish_reason"] == "length" and len(long["text"]) == 8
    assert long["power_sample"]["max_tokens_cut_to"] == 8 and "max_tokens_cut_to" not in short["power_sample"]
    assert len(short["text"]) == 100
    # temperature 0: greedy (each token is its position's most likely)
    lp = short["logprobs"]
    assert all(t == max(top.values()) for t, top in zip(lp["token_logprobs"], lp["top_logprobs"]))
    full = hf(ids_of("b" + short["text"]))
    assert all(full[i].argmax().item() == VOCAB[ch] for i, ch in enumerate(short["text"]))


def test_seed_reproducible_and_independent_of_the_prompt_position(server):
    body = {"model": "tiny", "prompt": "the answer", "max_tokens": 12, "seed": 1234, "temperature": 0.8,
            "stop": ["\n", "<eos>"], "method": "plain"}

    def texts(b):
        r = httpx.post(server.url + "/v1/completions", json=b, timeout=60)
        assert r.status_code == 200, r.text
        return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]

    one = texts(body)
    assert texts(body) == one  # lm-eval's generate payload, twice
    assert texts(dict(body, prompt=["other prompt", "the answer"]))[1] == one[0]  # batch position: no effect
    assert texts(dict(body, seed=99)) != one
    mh = dict(body, method="mh", **MH)
    assert texts(mh) == texts(mh)


def test_bad_logprob_fields_are_400(server):
    for route, body, match in (
            ("/v1/completions", {"prompt": "a", "logprobs": 21}, "'logprobs' must be an integer in 0..20"),
            ("/v1/completions", {"prompt": "a", "logprobs": True}, "'logprobs' must be an integer"),
            ("/v1/completions", {"prompt": "a", "echo": "yes"}, "'echo' must be true or false"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "logprobs": 3},
             "'logprobs' must be true or false"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
             "'top_logprobs' needs 'logprobs': true"),
            ("/v1/completions", {"prompt": "a", "prompt_logprobs": 1}, "echo=true and logprobs=N"),
            ("/v1/completions", {"prompt": "a", "temperature": -1, **PLAIN}, "temperature must be >= 0")):
        r = httpx.post(server.url + route, content=json.dumps(body), headers={"Content-Type": "application/json"},
                       timeout=30)
        assert r.status_code == 400 and match in r.json()["error"]["message"], r.text
