"""`powersample-fast serve`: the real server in a subprocess on a free localhost port, with a tiny
bigram model (tiny_lm.py: no EOS, so every chain runs to its budget), called with the official
`openai` client and with raw HTTP."""
import json
import socket
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from tiny_lm import cli_command, make_random_model_dir, subprocess_env  # noqa: E402

MH = {"mcmc_steps": 2, "block_size": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    model = make_random_model_dir(tmp / "model", ctx=2048)  # room for requests long enough to abort
    port = _free_port()
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen(cli_command() + ["serve", "--model", str(model), "--port", str(port), "--max-batch", "8",
                                             "--max-pending", "8", "--served-model-name", "tiny"],
                            env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not come up:\n{(tmp / 'server.log').read_text()}")
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        yield SimpleNamespace(url=url, proc=proc, client=client, log=tmp / "server.log")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def stats(server):
    return httpx.get(server.url + "/stats", timeout=5).json()


def test_models_and_health(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in server.client.models.list().data] == ["tiny"]


def test_completion_n_and_determinism(server):
    kw = dict(model="tiny", prompt="hello", max_tokens=12, n=3, seed=1, extra_body=MH)
    r = server.client.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:  # one character per token, no EOS in this model: the whole budget
        assert len(c.text) == 12 and c.finish_reason == "length"
        ps = c.model_extra["power_sample"]
        assert ps["method"] == "mh" and ps["num_tokens"] == 12 and ps["proposed"] == 2 * 3 and ps["stats"]["tokens_sampled"] >= 12
    assert len({c.text for c in r.choices}) > 1  # samples differ
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 36 and r.usage.total_tokens == 41
    assert [c.text for c in server.client.completions.create(**kw).choices] == [c.text for c in r.choices]
    # a list of prompts: one engine request each, choices in (prompt, sample) order
    r2 = server.client.completions.create(model="tiny", prompt=["ab", "cd"], max_tokens=4, n=2, seed=3, extra_body=MH)
    assert [c.index for c in r2.choices] == [0, 1, 2, 3] and r2.usage.prompt_tokens == 4


def test_chat_plain_and_stop(server):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, seed=0, temperature=0.7,
                                              extra_body={"method": "plain"})
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant"
    assert len(c.message.content) == 10 and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len("s:be brief\nu:hi\na:")  # the chat template, one token per character
    text = c.message.content
    stop = text[4]
    r = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, seed=0, temperature=0.7,
                                              stop=[stop], extra_body={"method": "plain"})
    assert r.choices[0].message.content == text[:text.index(stop)] and r.choices[0].finish_reason == "stop"


def test_streaming(server):
    kw = dict(model="tiny", prompt="stream me", max_tokens=10, seed=5, extra_body={"method": "plain"})
    full = server.client.completions.create(**kw).choices[0].text
    chunks = list(server.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) == 10 and "".join(texts) == full  # plain: token by token
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10
    # MH streams only what is final: the whole text in one chunk with its finish_reason
    msgs = [{"role": "user", "content": "x"}]
    full = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=2, extra_body=MH)
    chunks = list(server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=2,
                                                        stream=True, extra_body=MH))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert deltas == [full.choices[0].message.content] and chunks[-1].choices[0].finish_reason == "length"
    # raw SSE framing
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      json={"prompt": "raw", "max_tokens": 3, "stream": True, "method": "plain", "seed": 1}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_concurrent_clients_share_the_batch(server):
    out = [None] * 8

    def ask(i):
        out[i] = server.client.completions.create(model="tiny", prompt=f"client {i}", max_tokens=16, seed=i,
                                                  extra_body={"mcmc_steps": 2, "block_size": 8})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None and len(r.choices[0].text) == 16 for r in out)
    st = stats(server)
    assert st["max_running_requests"] > 1 and st["engine"]["max_batch_rows"] > 1, st


@pytest.mark.parametrize("body,status,match", [
    ({"prompt": "hi", "alpha": -1}, 400, "alpha must be a finite number > 0 (got -1)"),
    ({"prompt": "hi", "n": "two"}, 400, "n (samples per prompt) must be an integer >= 1 (got 'two')"),
    ({"prompt": "hi", "method": "nope"}, 400, "'nope'"),
    ({"prompt": "hi", "mcmc_step": 3}, 400, "unknown parameter 'mcmc_step'; did you mean 'mcmc_steps'?"),
    ({"prompt": "a" * 2100}, 400, "leaves no room for new tokens in the context of 2048 tokens"),
    ({"prompt": "a" * 2000, "max_tokens": 100}, 400, "exceeds the model's context of 2048 tokens"),
    ({"max_tokens": 3}, 400, "'prompt' must be"),
    ({"prompt": "hi", "top_p": 0.5}, 400, "top_p=0.5 is not supported"),
    ({"prompt": "hi", "stop": 5}, 400, "'stop' must be"),
    ({"prompt": "hi", "n": 9}, 400, "more than the server's --max-pending 8"),
    ("{not json", 400, "not valid JSON"),
])
def test_bad_requests_are_400(server, body, status, match):
    kw = {"content": body} if isinstance(body, str) else {"json": body}
    r = httpx.post(server.url + "/v1/completions", timeout=30, **kw)
    assert r.status_code == status and match in r.json()["error"]["message"], r.text


def test_bad_request_messages_match_the_python_api(server):
    from powersample_fast.errors import ConfigError
    from powersample_fast.params import SamplingParams

    with pytest.raises(ConfigError) as e:
        SamplingParams(mcmc_steps=-2)
    with pytest.raises(openai.BadRequestError) as err:
        server.client.completions.create(model="tiny", prompt="hi", max_tokens=4, extra_body={"mcmc_steps": -2})
    assert err.value.status_code == 400 and err.value.body["message"] == str(e.value)


def test_disconnect_frees_rows_and_full_queue_is_503(server):
    before = stats(server)["requests"]["aborted"]
    # ~7000 decode steps: still running when the client goes away
    body = json.dumps({"prompt": "long", "max_tokens": 200, "mcmc_steps": 10, "block_size": 16, "seed": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    deadline = time.time() + 30
    while stats(server)["pending"] < 1:
        assert time.time() < deadline
        time.sleep(0.02)
    # 1 pending + 8 prompts > --max-pending 8: the server is full
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ["p"] * 8, "max_tokens": 2, **MH}, timeout=30)
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "full" in r.json()["error"]["message"]
    sock.close()  # the client goes away mid-request
    while True:
        st = stats(server)
        if st["requests"]["aborted"] == before + 1 and st["pending"] == 0 and st["num_running"] == 0:
            break
        assert time.time() < deadline, st
        time.sleep(0.05)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ["p"] * 8, "max_tokens": 2, **MH}, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"]) == 8


def test_stream_disconnect_frees_rows(server):
    before = stats(server)["requests"]["aborted"]
    body = {"prompt": "s", "max_tokens": 2000, "method": "plain", "stream": True, "seed": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        first = next(line for line in r.iter_lines() if line)
        assert first.startswith("data: {")
    # the stream is closed after one token of 2000: the request is aborted
    deadline = time.time() + 30
    while True:
        st = stats(server)
        if st["requests"]["aborted"] == before + 1 and st["pending"] == 0 and st["num_running"] == 0:
            break
        assert time.time() < deadline, st
        time.sleep(0.05)


def test_still_healthy_afterwards(server):
    assert server.proc.poll() is None
    assert httpx.get(server.url + "/health").status_code == 200
    st = stats(server)
    assert st["pending"] == 0 and st["num_running"] == 0 and st["num_waiting"] == 0
    assert st["requests"]["errors"] == 0
    r = server.client.completions.create(model="tiny", prompt="bye", max_tokens=3, extra_body=MH)
    assert len(r.choices[0].text) == 3
