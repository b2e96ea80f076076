"""The engine's owner thread for `serve`: requests and aborts come in through a thread-safe inbox,
`RequestOutput`s go out through per-request callbacks (the server wraps them in
`loop.call_soon_threadsafe`). The engine is not thread-safe, so nothing else touches it.

Server shutdown (`shutdown`, safe to call from a signal handler) aborts every request at once: each
sink gets ("cut", RequestCut("shutdown")), and requests that arrive later get ("error", RequestCut).
"""
import hashlib
import logging
import queue
import threading

log = logging.getLogger("powersample_fast.server")


def seed_key(ids, params, i: int) -> int:
    """The `prompt_index` a prompt's chains are seeded with: with a request seed, one from the prompt's
    tokens (its samples depend on (seed, prompt, sample index, parameters) only, not on its position
    in the request: lm-eval's batch size does not change them); without one, its position."""
    if params.seed is None:
        return i
    return int.from_bytes(hashlib.blake2b(repr(list(ids)).encode(), digest_size=4).digest(), "little")


class RequestCut(Exception):
    """A request the server stopped before its sampler finished it: reason "shutdown" or "timeout"."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class EngineWorker:
    """Owns the engine in one thread; `submit` / `abort` may be called from any thread."""

    def __init__(self, engine, max_pending: int = 256):
        self.engine, self.max_pending = engine, max_pending
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks = {}  # request id -> callable taking a RequestOutput (engine thread only)
        self.lock = threading.Lock()
        self.pending = 0  # chains (prompts x n) reserved by handlers and not yet released
        self.counters = {"requests": 0, "finished": 0, "aborted": 0, "errors": 0, "rejected_full": 0}
        self.snapshot = {"engine": dict(engine.stats), "num_running": 0, "num_waiting": 0, "max_running_requests": 0}
        self.thread = threading.Thread(target=self._run, name="powersample-engine", daemon=True)
        self._stop = False
        self.closing = False  # set by shutdown(): no new requests, running ones are aborted

    def start(self):
        self.thread.start()

    def stop(self):
        self._stop = True
        self.inbox.put(None)

    def shutdown(self):
        """Abort every request and refuse new ones. Signal-safe: a flag and a SimpleQueue.put."""
        self.closing = True
        self.inbox.put(("shutdown",))

    def join(self, timeout: float) -> bool:
        """Stop the engine thread and wait for it (it ends after its current step). True if it ended."""
        self.stop()
        if self.thread.is_alive():
            self.thread.join(timeout)
        return not self.thread.is_alive()

    def reserve(self, k: int) -> bool:
        with self.lock:
            if self.pending + k > self.max_pending:
                self.counters["rejected_full"] += 1
                return False
            self.pending += k
            return True

    def release(self, k: int):
        with self.lock:
            self.pending -= k

    def submit(self, prompts, params, stream: bool, sink):
        """Queue one engine request per prompt (params: one SamplingParams, or one per prompt); `sink`
        gets ("added", ids) or ("error", exc) first."""
        self.inbox.put(("add", prompts, params, stream, sink))

    def abort(self, rids):
        self.inbox.put(("abort", list(rids)))

    def stats(self) -> dict:
        with self.lock:
            pending = self.pending
        return dict(self.snapshot, requests=dict(self.counters), pending=pending, max_pending=self.max_pending)

    # ------------------------------------------------------------------ engine thread
    def _handle(self, msg):
        eng = self.engine
        if msg[0] == "abort":
            for rid in msg[1]:
                if self.sinks.pop(rid, None) is not None and eng.abort(rid):
                    self.counters["aborted"] += 1
            return
        if msg[0] == "shutdown":
            for rid, sink in list(self.sinks.items()):
                if eng.abort(rid):
                    self.counters["aborted"] += 1
                sink(("cut", RequestCut("shutdown")))
            self.sinks.clear()
            return
        _, prompts, params, stream, sink = msg
        if self.closing:
            sink(("error", RequestCut("shutdown")))
            return
        rids = []
        plist = params if isinstance(params, list) else [params] * len(prompts)  # one per prompt, or shared
        try:
            for i, ids in enumerate(prompts):  # every prompt first, so that messages name its position
                eng.check_prompt(ids, plist[i], i)
            for i, ids in enumerate(prompts):
                rids.append(eng.add_request(ids, plist[i], stream=stream, prompt_index=seed_key(ids, plist[i], i)))
        except Exception as e:  # validation (ConfigError) or anything else: nothing of it stays queued
            for rid in rids:
                eng.abort(rid)
            sink(("error", e))
            return
        self.counters["requests"] += len(rids)
        for rid in rids:
            self.sinks[rid] = sink
        sink(("added", rids))

    def _run(self):
        eng = self.engine
        while not self._stop:
            try:
                msg = self.inbox.get(timeout=1.0) if not eng.has_unfinished() else self.inbox.get_nowait()
            except queue.Empty:
                msg = None
            if msg is not None:
                while msg is not None:
                    self._handle(msg)
                    try:
                        msg = self.inbox.get_nowait()
                    except queue.Empty:
                        msg = None
                self._snap(0)
            if self._stop or not eng.has_unfinished():
                continue
            try:
                outs = eng.step()
            except Exception as e:  # the engine failed as a whole: fail its requests, keep serving
                log.exception("engine step failed")
                for rid, sink in list(self.sinks.items()):
                    eng.abort(rid)
                    sink(("error", e))
                self.sinks.clear()
                continue
            for o in outs:
                sink = self.sinks.pop(o.request_id, None) if o.finished else self.sinks.get(o.request_id)
                if o.finished:
                    self.counters["errors" if o.error is not None else "finished"] += 1
                if sink is not None:
                    sink(o)
            self._snap(sum(o.finished for o in outs))

    def _snap(self, just_finished: int):
        """Publish the engine's stats for /stats (one atomic assignment; read from other threads)."""
        eng = self.engine
        # requests that decoded together in the last step: those still running + those it finished
        busiest = max(self.snapshot["max_running_requests"], eng.num_running + just_finished)
        self.snapshot = {"engine": dict(eng.stats), "num_running": eng.num_running,
                         "num_waiting": eng.num_waiting, "max_running_requests": busiest}
