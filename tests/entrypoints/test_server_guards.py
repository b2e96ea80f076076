"""`serve` with its limits and security flags, as one real subprocess server: --api-key, Host checks,
JSON-only bodies, --max-body, --max-n / --max-mcmc-steps, --request-timeout."""
import json
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from helpers.server_proc import running_server  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "sekret-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MH = {"mcmc_steps": 2, "block_size": 4}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("guarded"), "--api-key", KEY, "--allow-host", "my.example",
                        "--max-body", "64KiB", "--max-n", 4, "--max-mcmc-steps", 50, "--request-timeout", 2,
                        "--max-batch", 4, "--max-pending", 8, headers=AUTH) as srv:
        srv.http = httpx.Client(base_url=srv.url, headers=AUTH, timeout=30)
        yield srv
        srv.http.close()


def err(r, status):
    assert r.status_code == status and r.headers["content-type"] == "application/json", (r.status_code, r.text)
    return r.json()["error"]["message"]


def test_api_key(server):
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key
    for method, path in (("GET", "/v1/models"), ("GET", "/stats"), ("GET", "/openapi.json"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, server.url + path, headers=headers, json={"prompt": "hi"}, timeout=10)
            assert "API key" in err(r, 401) and r.headers["www-authenticate"] == "Bearer"
    assert [m.id for m in server.client.models.list().data] == ["tiny"]  # the openai client sends the key
    assert len(server.client.completions.create(model="tiny", prompt="hi", max_tokens=2, extra_body=MH).choices) == 1


def test_json_only_and_host_header(server):
    body = json.dumps({"prompt": "hi", "max_tokens": 2, **MH})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = server.http.post("/v1/completions", content=body, headers=headers)
        assert "must be JSON" in err(r, 415)  # a web page's "simple" cross-origin POST starts nothing
    r = server.http.post("/v1/completions", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.2"):  # DNS rebinding
        assert "is not allowed" in err(server.http.get("/v1/models", headers={"Host": host}), 400)
    for host in ("localhost", f"localhost:{server.port}", "127.0.0.1", f"[::1]:{server.port}", "my.example:8080"):
        assert server.http.get("/v1/models", headers={"Host": host}).status_code == 200, host
    assert httpx.get(server.url + "/health", headers={"Host": "10.0.0.9"}).status_code == 200


def _raw(server, head: bytes, body: bytes = b"") -> bytes:
    """Send raw HTTP, read the reply until the server closes (it must: the body was not read)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + body)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_body_size(server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\n" % KEY.encode())
    t0 = time.time()
    # 100 MB announced, 1 KB sent: refused at once, nothing more is read
    out = _raw(server, head + b"Content-Length: 100000000\r\n\r\n", b'{"prompt": "' + b"a" * 1000)
    assert out.startswith(b"HTTP/1.1 413") and b"--max-body of 65536 bytes" in out and time.time() - t0 < 5
    # chunked, no length: counted as it arrives
    chunk = b"a" * 30000
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [b'{"prompt": "'] + [chunk] * 3) + b"0\r\n\r\n"
    out = _raw(server, head + b"Transfer-Encoding: chunked\r\n\r\n", chunks)
    assert out.startswith(b"HTTP/1.1 413")
    # under the limit but more characters than the context can hold: refused before tokenizing
    r = server.http.post("/v1/completions", json={"prompt": "a" * 60000})
    assert "prompt 0 has 60000 characters, more than the context of 2048 tokens can hold" in err(r, 400)
    assert server.http.get("/health").status_code == 200


def test_request_limits(server):
    post = server.http.post
    assert "n=5 is more than this server's --max-n 4" in err(post("/v1/completions", json={"prompt": "hi", "n": 5}), 400)
    for steps in (51, 1e9):
        r = post("/v1/completions", json={"prompt": "hi", "mcmc_steps": steps})
        assert "is more than this server's --max-mcmc-steps 50" in err(r, 400)
    r = post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "n": 4, "max_tokens": 2,
                                           "mcmc_steps": 50, "block_size": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_request_timeout(server):
    """--request-timeout 2: a long request is aborted after 2 s and its rows are freed; JSON: 504, a
    stream: its choice ends with finish_reason "abort"."""
    out = {}

    def plain():
        out["json"] = server.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1500, "mcmc_steps": 10,
                                                                "block_size": 16})

    t = threading.Thread(target=plain)
    t0 = time.time()
    t.start()
    body = {"prompt": "s", "max_tokens": 2000, "method": "plain", "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        events = [line for line in r.iter_lines() if line]
    t.join(30)
    assert time.time() - t0 < 10
    assert "--request-timeout of 2 s" in err(out["json"], 504) and out["json"].json()["error"]["type"] == "timeout"
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "abort"
    assert 0 < sum(bool(json.loads(e[6:])["choices"][0]["text"]) for e in events[:-2]) < 2000
    deadline = time.time() + 10
    while (st := server.http.get("/stats").json())["pending"] or st["num_running"]:
        assert time.time() < deadline, st
        time.sleep(0.05)
