"""OpenAI response shapes for `powersample-fast serve`: choices, chunks, usage, and the incremental
detokenisation of streamed choices with stop strings."""
from __future__ import annotations

import time
import uuid
from typing import List, Optional


def apply_stop(text: str, stop: List[str]):
    """(text cut before the first stop string, whether one was found)."""
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


class TextStream:
    """Incremental detokenisation of one choice, with stop strings held back until they resolve.

    Each push decodes only the tokens since the last complete character plus a few before them
    (vLLM's prefix / read offsets, as engine/stop_strings.py), and looks for stop strings only where
    the new characters could complete one, so a choice of n tokens costs O(n) tokenizer work, not
    O(n^2) (the text itself is still copied per push: cheap next to decoding)."""

    CONTEXT = 5  # tokens decoded before the first unread one (merges, leading spaces)

    def __init__(self, tokenizer, stop: List[str]):
        self.tok, self.stop, self.sent, self.stopped = tokenizer, stop, "", False
        self.ids: List[int] = []  # the tokens still needed for decoding (older ones are dropped)
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # the choice's text so far (complete characters)
        self.chunks = 0  # deltas sent
        self.hold = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, ids) -> str:
        if self.stopped:
            return ""
        self.ids.extend(int(t) for t in ids)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        now = self._decode(self.ids[self.prefix_offset:])
        if now.endswith("\ufffd") or len(now) <= len(before):  # an incomplete UTF-8 sequence, or no
            return ""                                            # new character: wait for the next token
        old = len(self.text)
        self.text += now[len(before):]
        self.prefix_offset = max(self.read_offset, len(self.ids) - self.CONTEXT)
        self.read_offset = len(self.ids)
        if self.prefix_offset > 64:  # forget tokens that will never be decoded again
            del self.ids[:self.prefix_offset]
            self.read_offset -= self.prefix_offset
            self.prefix_offset = 0
        start = max(0, old - self.hold)  # a stop string found now ends in the new characters
        tail, self.stopped = apply_stop(self.text[start:], self.stop)
        text = self.text[:start] + tail
        safe = text if self.stopped else text[:max(len(self.sent), len(text) - self.hold)]
        return self._emit(safe)

    def finish(self, final_text: str) -> str:
        """The rest of the final text (after stop strings); '' if a stop string ended it already."""
        return "" if self.stopped and self.sent else self._emit(final_text)

    def _emit(self, text: str) -> str:
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        self.chunks += bool(delta)
        return delta


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def choice_extra(r) -> dict:
    """What a choice carries besides the OpenAI fields."""
    return {"power_sample": {"method": getattr(r, "method", None), "accepted": r.accepted, "proposed": r.proposed, "finished_by_eos": r.finished_by_eos,
                             "finished_by_stop": getattr(r, "finished_by_stop", False),
                             "logp_sum": float(sum(r.logp)), "num_tokens": len(r.token_ids), "stats": r.stats}}


def response(kind: str, rid: str, model: str, choices: list, usage: Optional[dict]) -> dict:
    obj = {"completion": "text_completion", "chat": "chat.completion",
           "completion_chunk": "text_completion", "chat_chunk": "chat.completion.chunk"}[kind]
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None or not kind.endswith("chunk"):
        out["usage"] = usage
    return out


def choice(chat: bool, index: int, text: Optional[str], finish: Optional[str], chunk: bool = False,
           first: bool = True) -> dict:
    if not chat:
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    if chunk:  # the role goes in a choice's first delta only, as OpenAI does
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
            "finish_reason": finish}


def usage(prompts: List[List[int]], completion_tokens: int) -> dict:
    p = sum(len(x) for x in prompts)
    return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens}
