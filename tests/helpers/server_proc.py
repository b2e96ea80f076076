"""A real `powersample-fast serve` in a subprocess on a free localhost port, over the tiny bigram
model of tiny_models.py (no EOS: every chain runs to its budget), for the server tests."""
from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from types import SimpleNamespace

import httpx
import pytest

from helpers.tiny_models import cli_command, make_random_model_dir, subprocess_env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(tmp, *args, ctx: int = 2048, headers=None, model=None):
    """Yields SimpleNamespace(url, port, proc, client, log) once /health answers; stops it after
    (SIGTERM, then SIGKILL after 10 s). `args`: extra `serve` flags; `headers` for the /health poll
    and the openai client (an API key)."""
    import openai

    model = model or make_random_model_dir(tmp / "model", ctx=ctx)  # ctx: room for requests long enough to abort
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(cli_command() + ["serve", "--model", str(model), "--port", str(port),
                                             "--served-model-name", "tiny", *map(str, args)],
                            env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not come up:\n{log_path.read_text()}")
            time.sleep(0.2)
        key = (headers or {}).get("Authorization", "Bearer none").split(" ", 1)[1]
        client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)
        yield SimpleNamespace(url=url, port=port, proc=proc, client=client, log=log_path)
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
