"""`serve` stops promptly on SIGTERM / SIGINT with long requests in flight: they are aborted (JSON:
503; a stream: finish_reason "abort" and [DONE]), the process exits 0 within seconds, and a second
signal ends it at once, cleanly."""
import json
import signal
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from helpers.server_proc import running_server  # noqa: E402

pytestmark = pytest.mark.slow
LONG_MH = {"prompt": "long", "max_tokens": 2000, "mcmc_steps": 10, "block_size": 16}  # minutes of work


def _start_long_requests(srv):
    """One JSON MH request, one streaming MH request, one streaming plain request (already streaming)."""
    out = {"plain": [], "mh_stream": []}

    def post():
        try:
            out["json"] = httpx.post(srv.url + "/v1/completions", json=LONG_MH, timeout=60)
        except httpx.HTTPError as e:
            out["json"] = e

    def stream(key, body):
        try:
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
                out[key + "_status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        out[key].append(line[6:])
        except httpx.HTTPError as e:
            out[key].append(e)

    threads = [threading.Thread(target=post),
               threading.Thread(target=stream, args=("mh_stream", dict(LONG_MH, stream=True))),
               threading.Thread(target=stream, args=("plain", {"prompt": "p", "max_tokens": 2000, "method": "plain",
                                                               "stream": True}))]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while httpx.get(srv.url + "/stats", timeout=5).json()["num_running"] < 3 or not out["plain"]:
        assert time.time() < deadline
        time.sleep(0.05)
    return out, threads


def _stopped_within(srv, seconds):
    t0 = time.time()
    rc = srv.proc.wait(seconds)  # raises TimeoutExpired if it is still alive
    return rc, time.time() - t0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_aborts_requests_and_exits_0(tmp_path, sig):
    with running_server(tmp_path, "--max-batch", 4) as srv:
        out, threads = _start_long_requests(srv)
        srv.proc.send_signal(sig)
        rc, took = _stopped_within(srv, 10)
        for t in threads:
            t.join(10)
        log = srv.log.read_text()
        assert rc == 0 and took < 5, (rc, took, log)
        r = out["json"]
        assert r.status_code == 503 and r.json()["error"]["message"] == \
            "the server is shutting down; this request was aborted", r
        for key in ("plain", "mh_stream"):  # every choice ends, marked as cut
            assert out[key + "_status"] == 200 and out[key][-1] == "[DONE]", out[key][-3:]
            assert json.loads(out[key][-2])["choices"][0]["finish_reason"] == "abort"
        assert len(out["plain"]) > 2  # tokens streamed before the signal
        assert "terminate called" not in log and "Traceback" not in log, log


@pytest.mark.parametrize("first,second", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGINT)])
def test_second_signal_exits_at_once(tmp_path, first, second):
    with running_server(tmp_path, "--max-batch", 4) as srv:
        _, threads = _start_long_requests(srv)
        srv.proc.send_signal(first)
        time.sleep(0.02)
        srv.proc.send_signal(second)
        rc, took = _stopped_within(srv, 10)
        for t in threads:
            t.join(10)
        log = srv.log.read_text()
        assert rc == 0 and took < 3, (rc, took, log)
        assert "terminate called" not in log and "Traceback" not in log, log
