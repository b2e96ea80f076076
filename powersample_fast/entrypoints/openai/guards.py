"""What `serve` checks before a request reaches a route: one ASGI middleware, in this order:

- Host header (DNS-rebinding protection): localhost, 127.0.0.1, [::1] or the bind host, with or
  without a port, plus `--allow-host` names ("*": any). 400 otherwise. Not on /health.
- `--api-key`: `Authorization: Bearer KEY` on every route but /health (as `vllm serve --api-key`). 401.
- POST bodies: Content-Type must be JSON (a web page's cross-origin "simple" POST is text/plain or a
  form, and never gets past this: 415), and at most `--max-body` bytes (413, read no further).

Errors are OpenAI-shaped JSON: {"error": {"message", "type", "param", "code"}}, one line each.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Iterable, Optional

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 415: "invalid_request_error", 503: "server_unavailable", 504: "timeout"}


def error_payload(status: int, message: str) -> dict:
    """The OpenAI error object; the message is one line, at most 1000 characters, valid UTF-8."""
    msg = " ".join(str(message).split("\n")).encode("utf-8", "backslashreplace").decode("utf-8")
    if len(msg) > 1000:
        msg = msg[:997] + "..."
    return {"error": {"message": msg, "type": _TYPES.get(status, "internal_error"), "param": None, "code": status}}


def error_response(status: int, message: str, headers: Optional[dict] = None):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_payload(status, message), status_code=status, headers=headers)


def host_name(header: str) -> str:
    """'Example.COM:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: Optional[str], allow_hosts: Iterable[str]) -> Optional[str]:
    """A stderr line for a server others can reach: without a key anyone there may run generations."""
    if is_loopback(host_name(host)):
        return None
    out = f"serving on {host} without --api-key: anyone who can reach this port can run generations; " \
          "pass --api-key (or set POWERSAMPLE_FAST_API_KEY)" if not api_key else None
    if not list(allow_hosts) and host in ("0.0.0.0", "::"):
        out = (out + "; " if out else "") + "requests whose Host header is not localhost get 400: name the " \
              "server's host names with --allow-host (or '*')"
    return out


class Guards:
    """ASGI middleware: host, API key, Content-Type and body size (see the module docstring)."""

    def __init__(self, app, *, bind_host: str = "127.0.0.1", allow_hosts: Iterable[str] = (),
                 api_key: Optional[str] = None, max_body: int = 4 << 20):
        self.app, self.api_key, self.max_body = app, api_key, max_body
        allow = [host_name(h) for h in allow_hosts]
        self.any_host = "*" in allow
        self.hosts = set(LOCAL_HOSTS) | {host_name(bind_host)} | set(allow)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] != "/health":
            host = headers.get(b"host")
            if host is not None and not self.any_host and host_name(host) not in self.hosts:
                return await _send_error(send, 400, f"Host {host!r} is not allowed; call this server as "
                                         "localhost, or start it with --allow-host NAME")
            if self.api_key is not None and not self._key_ok(headers.get(b"authorization", "")):
                return await _send_error(send, 401, "missing or wrong API key: send the header "
                                         "'Authorization: Bearer KEY' with the server's --api-key",
                                         [(b"www-authenticate", b"Bearer")])
        if scope["method"] == "POST":
            ctype = headers.get(b"content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json" and not ctype.endswith("+json"):
                return await _send_error(send, 415, f"the request body must be JSON (Content-Type: application/"
                                         f"json; got {ctype or 'none'!r})", close=True)
            declared = headers.get(b"content-length", "")
            if declared.isdigit() and int(declared) > self.max_body:
                return await _send_error(send, 413, self._too_large(), close=True)
            body = await self._read(receive)
            if body is None:
                return await _send_error(send, 413, self._too_large(), close=True)
            receive = _replay(body, receive)
        return await self.app(scope, receive, send)

    def _key_ok(self, auth: str) -> bool:
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def _too_large(self) -> str:
        return f"the request body is larger than this server's --max-body of {self.max_body} bytes"

    async def _read(self, receive) -> Optional[bytes]:
        """The whole body, or None once it passes max_body (the rest is not read)."""
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client went away
                return b""
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None
            chunks.append(chunk)
            if not msg.get("more_body"):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive that gives the buffered body once, then the client's own messages (disconnects)."""
    sent = []

    async def replay():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send, status: int, message: str, headers=(), close: bool = False):
    body = json.dumps(error_payload(status, message)).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    if close:  # the body was not read: this connection cannot carry another request
        hdrs.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})
