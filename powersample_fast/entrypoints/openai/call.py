"""One HTTP request's engine requests (one per prompt) in `serve`, from "added" to the response:
`complete` gathers them into one JSON response, `sse` streams them as server-sent events.

A request ends early when its client goes away (aborted, rows freed), when it runs past the
server's --request-timeout, or when the server shuts down (both `RequestCut`): a JSON response is
then an error (504 / 503), a stream ends its open choices with finish_reason "abort" and [DONE].
"""
from __future__ import annotations

import asyncio
import json

from . import protocol as proto
from .worker import RequestCut
from .guards import error_payload, error_response
from .logprobs import Annotator, StreamState

POLL_S = 0.2  # how often a waiting handler checks that its client is still there
PING_S = 10.0  # SSE comment sent when a stream has been silent this long


class EngineFailed(Exception):
    """The engine failed as a whole (not this request's input)."""


def status_for(exc: BaseException) -> int:
    """HTTP status of a request that ended with `exc`: input errors (ConfigError, ValueError,
    TypeError; NonFiniteLogitsError, a FloatingPointError: a temperature or alpha the logits
    overflow at) are 400; shutdown 503; timeout 504; anything else 500."""
    if isinstance(exc, RequestCut):
        return 503 if exc.reason == "shutdown" else 504
    if isinstance(exc, (ValueError, TypeError, FloatingPointError, RecursionError)):
        return 400
    return 500


def cut_message(cut: RequestCut, timeout_s: float) -> str:
    if cut.reason == "shutdown":
        return "the server is shutting down; this request was aborted"
    return (f"the request ran longer than this server's --request-timeout of {timeout_s:g} s and was aborted; "
            "ask for fewer tokens, samples or MCMC steps")


class Call:
    def __init__(self, worker, request, req, events, rids, reserved, deadline: float, timeout_s: float,
                 tokenizer=None):
        self.worker, self.request, self.req, self.events = worker, request, req, events
        self.tokenizer = tokenizer
        self.rids, self.reserved = list(rids), reserved
        self.open = set(self.rids)
        self.checked = 0.0  # event-loop time of the last disconnect check
        self.deadline, self.timeout_s = deadline, timeout_s

    async def next(self):
        """The next RequestOutput, "ping" after PING_S of silence, or None when the client has gone
        (its requests are then aborted). The client is checked every POLL_S, also while outputs flow.
        Raises RequestCut (timeout, shutdown) or EngineFailed."""
        loop = asyncio.get_running_loop()
        silent_since = loop.time()
        while True:
            if loop.time() >= self.deadline:
                self.close()
                raise RequestCut("timeout")
            if loop.time() - self.checked >= POLL_S:
                self.checked = loop.time()
                if await self.request.is_disconnected():
                    self.close()
                    return None
            try:
                item = await asyncio.wait_for(self.events.get(), min(POLL_S, max(0.0, self.deadline - loop.time())))
            except asyncio.TimeoutError:
                if loop.time() - silent_since >= PING_S:
                    return "ping"
                continue
            if isinstance(item, tuple):  # ("cut", RequestCut) or ("error", exc): the engine failed as a whole
                self.open = set()  # the engine thread dropped them already
                if item[0] == "cut":
                    raise item[1]
                raise EngineFailed(f"the engine failed: {type(item[1]).__name__}: {item[1]}")
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
        """[(choice index, text, finish_reason, result, prompt index, prompt log-probs)], usage."""
        n = self.req.params.n
        choices, ntok = [], 0
        for i, rid in enumerate(self.rids):
            results, prompt_lp = results_by_rid[rid]
            for j, r in enumerate(results):
                text, hit = proto.apply_stop(r.text, self.req.stop)
                finish = "stop" if (hit or r.finished_by_eos or r.finished_by_stop) else "length"
                choices.append((i * n + j, text, finish, r, i, prompt_lp))
                ntok += 0 if self.req.score_only else len(r.token_ids)
        return choices, proto.usage(self.req.prompts, ntok)

    def extra(self, r, i) -> dict:
        """The choice's power_sample object (+ where max_tokens was cut to the context)."""
        out = proto.choice_extra(r)
        budget = self.req.params_for(i).max_new_tokens
        if budget < self.req.max_tokens:
            out["power_sample"]["max_tokens_cut_to"] = budget
        return out

    async def complete(self, chat, model_name):
        results = {}
        try:
            while self.open:
                o = await self.next()
                if o is None:
                    return error_response(400, "client disconnected")  # nobody reads it
                if o == "ping" or not o.finished:
                    continue
                if o.error is not None:
                    return error_response(status_for(o.error), f"{type(o.error).__name__}: {o.error}")
                results[o.request_id] = (o.results, o.prompt_logprobs)
        except RequestCut as cut:
            return error_response(status_for(cut), cut_message(cut, self.timeout_s),
                                  headers={"Connection": "close"} if cut.reason == "shutdown" else None)
        except EngineFailed as e:
            return error_response(500, str(e))
        finally:
            self.close()
        choices, usage = self.final_choices(chat, results)
        ann = Annotator(self.tokenizer, self.req)
        out = [dict(ann.complete(proto.choice(chat, idx, text, fin), chat, i, r, plp), **self.extra(r, i))
               for idx, text, fin, r, i, plp in choices]
        return proto.response("chat" if chat else "completion", proto.new_id("chatcmpl" if chat else "cmpl"),
                              model_name, out, usage)

    async def sse(self, chat, model_name, tokenizer):
        kind = "chat_chunk" if chat else "completion_chunk"
        cid = proto.new_id("chatcmpl" if chat else "cmpl")
        n = self.req.params.n
        streams = {}  # choice index -> TextStream
        states = {}  # choice index -> logprobs.StreamState
        results = {}
        ann = Annotator(tokenizer, self.req)

        def chunk(choices, usage=None):
            return f"data: {json.dumps(proto.response(kind, cid, model_name, choices, usage))}\n\n"

        def first(idx):
            return idx not in streams or streams[idx].chunks == 0

        try:
            while self.open:
                o = await self.next()
                if o is None:
                    return
                if o == "ping":
                    yield ": ping\n\n"
                    continue
                if o.error is not None:
                    yield f"data: {json.dumps(error_payload(status_for(o.error), f'{type(o.error).__name__}: {o.error}'))}\n\n"
                    return
                pi = self.rids.index(o.request_id)
                for j, ids in sorted(o.new_tokens.items() if self.req.params.method == "plain" else ()):
                    ts = streams.setdefault(pi * n + j, proto.TextStream(tokenizer, self.req.stop))
                    st = states.setdefault(pi * n + j, StreamState())
                    st.add(ids, o.new_logprobs.get(j))
                    fst = first(pi * n + j)
                    delta = ts.push(ids)
                    if delta:
                        c = proto.choice(chat, pi * n + j, delta, None, chunk=True, first=fst)
                        yield chunk([ann.stream(c, chat, pi, st, o.prompt_logprobs, *st.take())])
                if o.finished:
                    results[o.request_id] = (o.results, o.prompt_logprobs)
        except RequestCut:  # every choice ends here: "abort" (what it streamed so far stays valid for plain)
            for idx in range(len(self.rids) * n):
                yield chunk([proto.choice(chat, idx, "", "abort", chunk=True, first=first(idx))])
            yield "data: [DONE]\n\n"
            return
        except EngineFailed as e:
            yield f"data: {json.dumps(error_payload(500, str(e)))}\n\n"
            return
        finally:
            self.close()
        choices, usage = self.final_choices(chat, results)
        for idx, text, fin, r, i, plp in choices:
            ts = streams.setdefault(idx, proto.TextStream(tokenizer, self.req.stop))
            st = states.setdefault(idx, StreamState())
            fst = ts.chunks == 0
            rest = ts.finish(text)
            ids, entries = ann.gen(r)
            c = ann.stream(proto.choice(chat, idx, rest, fin, chunk=True, first=fst), chat, i, st, plp,
                           ids[st.sent:], entries[st.sent:])
            yield chunk([dict(c, **self.extra(r, i))])
        if self.req.include_usage:
            yield chunk([], usage)
        yield "data: [DONE]\n\n"
