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
    """Incremental detokenisation of one choice, with stop strings held back until they resolve."""

    def __init__(self, tokenizer, stop: List[str]):
        self.tok, self.stop, self.ids, self.sent, self.stopped = tokenizer, stop, [], "", False
        self.chunks = 0  # deltas sent
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, ids) -> str:
        if self.stopped:
            return ""
        self.ids.extend(ids)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        text, self.stopped = apply_stop(text, self.stop)
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
