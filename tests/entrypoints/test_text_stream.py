"""The server's streamed text (openai/shapes.py TextStream) on the default model's byte-level BPE
tokenizer: the deltas add up to the choice's final text (cut at the first stop string), characters
split across tokens (emoji, CJK) are never sent half, and each token costs a bounded amount of
decoding, whatever the length (the stream used to decode every token again on each push). Slow: a
fresh machine builds the default model first (~30 s once)."""
import pytest

from powersample_fast.entrypoints.openai.shapes import TextStream, apply_stop

pytestmark = pytest.mark.slow

TEXT = ("Step 1: naïve café — 日本語 🙂🚀 costs $5.\n\nStep 2: x = a[i] + b{j} // 3; don't stop here. "
        "Answer: \\boxed{42} ### END and more text after it. ") * 6


@pytest.fixture(scope="module")
def tok():
    from powersample_fast.models import default_model as hub
    from powersample_fast.models.tokenizer import load_tokenizer

    return load_tokenizer(hub.default_model_dir(progress=False))


class Counting:
    """The tokenizer, counting the tokens it is asked to decode."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


@pytest.mark.parametrize("stop", [[], ["### END"], ["🚀 costs"], ["never there"]])
@pytest.mark.parametrize("per_push", [1, 3])
def test_deltas_add_up_to_the_final_text_in_linear_work(tok, stop, per_push):
    ids = tok.encode(TEXT, add_special_tokens=False)
    full = tok.decode(ids, skip_special_tokens=True)
    expect, stopped = apply_stop(full, stop)
    counting = Counting(tok)
    ts = TextStream(counting, stop)
    deltas = [ts.push(ids[i:i + per_push]) for i in range(0, len(ids), per_push)]
    deltas.append(ts.finish(expect))
    assert "".join(deltas) == expect
    assert all("\ufffd" not in d for d in deltas)
    assert ts.stopped == stopped
    if not stopped:  # streamed as it goes, not all at the end
        assert sum(map(bool, deltas)) > len(deltas) // 4
    assert counting.decoded <= 2 * (TextStream.CONTEXT + 2 * per_push) * len(deltas)  # O(tokens), not O(tokens^2)
