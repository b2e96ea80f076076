"""The ASGI app of `powersample-fast serve` (see server.py): routes over one `EngineWorker`, behind
guards.Guards. Request bodies are parsed and tokenized on one worker thread, never on the
event loop; one request's life after that is call.Call."""
import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor

from . import protocol as proto
from . import tokenizer_routes
from .worker import EngineWorker
from ...errors import ConfigError
from .call import Call, status_for
from .guards import Guards, error_response

log = logging.getLogger("powersample_fast.server")


def build_app(worker: EngineWorker, tokenizer, model_name: str, context: int, *, limits=None,
              request_timeout: float = 600.0, guards=None):
    """The ASGI app. limits: openai_protocol.Limits (default: only the worker's max_pending);
    request_timeout: seconds (0: none); guards: keyword arguments of guards.Guards (default:
    localhost only, no key, 4 MiB bodies)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from starlette.exceptions import HTTPException

    from ...sampling_params import SamplingParams

    try:
        from . import schema
    except ImportError:  # pydantic 1 (FastAPI still allows it): /openapi.json without the request schemas
        schema = None

    limits = limits or proto.Limits(max_chains=worker.max_pending)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="powersample-parse")

    @asynccontextmanager
    async def lifespan(app):
        if not worker.thread.is_alive():
            worker.start()
        yield
        worker.stop()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="powersample-fast", lifespan=lifespan)
    if schema is not None:
        schema.install(app)

    @app.exception_handler(HTTPException)  # unknown routes, wrong methods: OpenAI-shaped too
    async def _http(request, exc):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, exc):  # a bug in a handler answers 500; the server keeps serving
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health():
        if worker.closing:
            return error_response(503, "the server is shutting down")
        return {"status": "ok"} if worker.thread.is_alive() else error_response(503, "the engine thread has stopped")

    @app.get("/stats")
    async def stats():
        return worker.stats()

    card = {"id": model_name, "object": "model", "created": 0, "owned_by": "powersample-fast", "max_model_len": context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            return error_response(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}")
        return card

    def parse(raw: bytes, chat: bool):  # on the pool's thread
        try:
            body = json.loads(raw or b"null")
        except RecursionError:
            raise ConfigError("the request body is not valid JSON: it nests too deeply") from None
        except ValueError as e:
            raise ConfigError(f"the request body is not valid JSON: {e}") from None
        proto.check_unicode(body)
        return proto.parse_request(body, chat=chat, tokenizer=tokenizer, context=context,
                                   param_cls=SamplingParams, limits=limits)

    def closing():
        return error_response(503, "the server is shutting down", headers={"Connection": "close"})

    async def serve(request: Request, chat: bool):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + request_timeout if request_timeout else float("inf")
        if worker.closing:
            return closing()
        try:
            req = await loop.run_in_executor(pool, parse, await request.body(), chat)
        except ConfigError as e:
            return error_response(400, str(e))
        except (ValueError, TypeError, RecursionError, FloatingPointError) as e:
            return error_response(400, f"invalid request ({type(e).__name__}: {e})")
        if worker.closing:
            return closing()
        k = len(req.prompts) * req.params.n  # chains (--max-pending is checked per request by parse)
        if not worker.reserve(k):
            return error_response(503, f"the server is full ({worker.max_pending} chains pending); retry later",
                                  headers={"Retry-After": "1"})
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
        worker.submit(req.prompts, req.prompt_params or req.params, req.stream and req.params.method == "plain", sink)
        try:
            kind, payload = await events.get()
        except asyncio.CancelledError:
            gone.append(True)
            worker.release(k)
            raise
        if kind == "error":
            worker.release(k)
            if status_for(payload) == 503:
                return closing()
            return error_response(status_for(payload), str(payload))
        call = Call(worker, request, req, events, payload, k, deadline, request_timeout, tokenizer)
        if req.stream:
            return StreamingResponse(call.sse(chat, model_name, tokenizer), media_type="text/event-stream")
        return await call.complete(chat, model_name)

    async def run_blocking(fn, *args):  # the tokenizer routes: on the parse worker too
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    tokenizer_routes.install(app, tokenizer, context, run_blocking)

    @app.post("/v1/completions", openapi_extra=schema and schema.body(schema.CompletionRequest))
    async def completions(request: Request):
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions", openapi_extra=schema and schema.body(schema.ChatCompletionRequest))
    async def chat_completions(request: Request):
        return await serve(request, chat=True)

    return Guards(app, **(guards or {}))
