"""`powersample-fast serve`: an OpenAI-compatible HTTP server over one running engine.

One background thread owns the engine (it is not thread-safe) and loops: take new requests and aborts
from a thread-safe inbox, run one `engine.step()`, hand each `RequestOutput` to its handler through
`loop.call_soon_threadsafe`. So requests from many clients join the running decode batch between
steps (continuous batching), and a client that goes away has its request aborted (its rows freed).
Needs the `serve` extra (FastAPI + uvicorn).
"""
import asyncio
import json
import logging
import sys
import time

from . import openai_protocol as proto
from .cli_setup import add_engine_args, apply_threads, check_engine_args, note_slow_dtype
from .engine_thread import EngineWorker
from .errors import ConfigError

log = logging.getLogger("powersample_fast.server")
POLL_S = 0.2  # how often a waiting handler checks that its client is still there
PING_S = 10.0  # SSE comment sent when a stream has been silent this long


def _error(status: int, message: str, headers=None):
    from fastapi.responses import JSONResponse

    kind = {400: "invalid_request_error", 503: "server_overloaded"}.get(status, "internal_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status, headers=headers)


def build_app(worker: EngineWorker, tokenizer, model_name: str, context: int):
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from contextlib import asynccontextmanager

    from .params import SamplingParams

    @asynccontextmanager
    async def lifespan(app):
        if not worker.thread.is_alive():
            worker.start()
        yield
        worker.stop()

    app = FastAPI(title="powersample-fast", lifespan=lifespan)

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # a bug in a handler answers 500; the server keeps serving
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        return {"status": "ok"} if worker.thread.is_alive() else _error(503, "the engine thread has stopped")

    @app.get("/stats")
    async def stats():
        return worker.stats()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "powersample-fast", "max_model_len": context}]}

    async def serve(request: Request, chat: bool):
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError as e:
            return _error(400, f"the request body is not valid JSON: {e}")
        try:
            req = proto.parse_request(body, chat=chat, tokenizer=tokenizer, context=context,
                                      param_cls=SamplingParams)
        except ConfigError as e:
            return _error(400, str(e))
        k = len(req.prompts) * req.params.n  # chains
        if k > worker.max_pending:
            return _error(400, f"this request asks for {k} chains (prompts x n), more than the server's "
                               f"--max-pending {worker.max_pending}")
        if not worker.reserve(k):
            return _error(503, f"the server is full ({worker.max_pending} chains pending); retry later",
                          headers={"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        gone = []  # set when this handler was cancelled before its requests were queued

        def sink(item):  # called from the engine thread
            if gone:
                if isinstance(item, tuple) and item[0] == "added":
                    worker.abort(item[1])
                return
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown)
                pass

        # token-by-token updates only for plain: an MH chain's tokens are not final until it ends
        worker.submit(req.prompts, req.params, req.stream and req.params.method == "plain", sink)
        try:
            kind, payload = await events.get()
        except asyncio.CancelledError:
            gone.append(True)
            worker.release(k)
            raise
        if kind == "error":
            worker.release(k)
            return _error(400 if isinstance(payload, ValueError) else 500, str(payload))
        call = _Call(worker, request, req, events, payload, k)
        if req.stream:
            return StreamingResponse(call.sse(chat, model_name, tokenizer), media_type="text/event-stream")
        return await call.complete(chat, model_name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    return app


class _Call:
    """One HTTP request's engine requests (one per prompt), from "added" to the last output."""

    def __init__(self, worker, request, req, events, rids, reserved):
        self.worker, self.request, self.req, self.events = worker, request, req, events
        self.rids, self.reserved = list(rids), reserved
        self.open = set(self.rids)
        self.checked = 0.0  # event-loop time of the last disconnect check

    async def next(self):
        """The next RequestOutput, "ping" after PING_S of silence, or None when the client has gone
        (its requests are then aborted). The client is checked every POLL_S, also while outputs flow."""
        loop = asyncio.get_running_loop()
        silent_since = loop.time()
        while True:
            if loop.time() - self.checked >= POLL_S:
                self.checked = loop.time()
                if await self.request.is_disconnected():
                    self.close()
                    return None
            try:
                item = await asyncio.wait_for(self.events.get(), POLL_S)
            except asyncio.TimeoutError:
                if loop.time() - silent_since >= PING_S:
                    return "ping"
                continue
            if isinstance(item, tuple):  # ("error", exc): the engine failed as a whole
                raise RuntimeError(f"the engine failed: {item[1]}")
            if item.finished:
                self.open.discard(item.request_id)
            return item

    def close(self):
        if self.open:
            self.worker.abort(self.open)
            self.open = set()
        if self.reserved:
            self.worker.release(self.reserved)
            self.reserved = 0

    def final_choices(self, chat, results_by_rid):
        n = self.req.params.n
        choices, ntok = [], 0
        for i, rid in enumerate(self.rids):
            for j, r in enumerate(results_by_rid[rid]):
                text, hit = proto.apply_stop(r.text, self.req.stop)
                finish = "stop" if (hit or r.finished_by_eos) else "length"
                choices.append((i * n + j, text, finish, r))
                ntok += len(r.token_ids)
        return choices, proto.usage(self.req.prompts, ntok)

    async def complete(self, chat, model_name):
        results = {}
        try:
            while self.open:
                o = await self.next()
                if o is None:
                    return _error(400, "client disconnected")  # nobody reads it
                if o == "ping" or not o.finished:
                    continue
                if o.error is not None:
                    return _error(400 if isinstance(o.error, ValueError) else 500, f"{type(o.error).__name__}: {o.error}")
                results[o.request_id] = o.results
        finally:
            self.close()
        choices, usage = self.final_choices(chat, results)
        out = [dict(proto.choice(chat, idx, text, fin), **proto.choice_extra(r)) for idx, text, fin, r in choices]
        return proto.response("chat" if chat else "completion", proto.new_id("chatcmpl" if chat else "cmpl"),
                              model_name, out, usage)

    async def sse(self, chat, model_name, tokenizer):
        kind = "chat_chunk" if chat else "completion_chunk"
        cid = proto.new_id("chatcmpl" if chat else "cmpl")
        n = self.req.params.n
        streams = {}  # choice index -> TextStream
        results = {}

        def chunk(choices, usage=None):
            return f"data: {json.dumps(proto.response(kind, cid, model_name, choices, usage))}\n\n"

        try:
            while self.open:
                o = await self.next()
                if o is None:
                    return
                if o == "ping":
                    yield ": ping\n\n"
                    continue
                if o.error is not None:
                    yield f"data: {json.dumps({'error': {'message': f'{type(o.error).__name__}: {o.error}'}})}\n\n"
                    return
                base = self.rids.index(o.request_id) * n
                for j, ids in sorted(o.new_tokens.items() if self.req.params.method == "plain" else ()):
                    ts = streams.setdefault(base + j, proto.TextStream(tokenizer, self.req.stop))
                    first = ts.chunks == 0
                    delta = ts.push(ids)
                    if delta:
                        yield chunk([proto.choice(chat, base + j, delta, None, chunk=True, first=first)])
                if o.finished:
                    results[o.request_id] = o.results
            choices, usage = self.final_choices(chat, results)
            for idx, text, fin, r in choices:
                ts = streams.setdefault(idx, proto.TextStream(tokenizer, self.req.stop))
                first = ts.chunks == 0
                rest = ts.finish(text)
                c = proto.choice(chat, idx, rest, fin, chunk=True, first=first)
                yield chunk([dict(c, **proto.choice_extra(r))])
            if self.req.include_usage:
                yield chunk([], usage)
            yield "data: [DONE]\n\n"
        finally:
            self.close()


def add_parser(subparsers):
    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (needs the [serve] extra)")
    add_engine_args(s, model_help="HF-format model directory, or 'default'",
                    device_help="torch device (default: cuda if available else cpu)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--max-pending", type=int, default=256,
                   help="chains (prompts x n) queued or running before new requests get 503 (default 256)")
    s.add_argument("--served-model-name", default=None, help="name in /v1/models (default: the --model value)")
    s.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    s.set_defaults(func=main)
    return s


def main(args) -> int:
    try:
        import uvicorn
    except ImportError:
        print("powersample-fast serve needs FastAPI and uvicorn: pip install 'powersample-fast[serve]'", file=sys.stderr)
        return 2
    check_engine_args(args)
    apply_threads(args)
    from .engine import Engine
    from .loader import load

    model, tok = load(args.model, device=args.device, dtype=args.dtype)
    note_slow_dtype(model)
    engine = Engine(model, tok, max_batch=args.max_batch, max_len=args.max_len,
                    cuda_graphs=args.cuda_graphs)
    name = args.served_model_name or args.model
    worker = EngineWorker(engine, max_pending=args.max_pending)
    app = build_app(worker, tok, name, min(engine.max_len, model.config.max_seq_len))
    print(f"powersample-fast: serving {name} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    log.info("served for %.0f s", time.perf_counter() - t0)
    return 0
