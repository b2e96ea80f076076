"""engine/cpu_step.py: decode steps replayed from TorchScript traces on CPU equal the eager step bit
for bit (logits and K/V writes) over changing KV lengths, across model families (tied, biased,
longrope crossing its switch, sliding window, partial rotary), in fp32 and bf16, with and without
packed weights; and whole runs through the engine (mh, smc) equal the eager runs exactly."""
import warnings

import pytest
import torch
import transformers as tf

import powersample_fast as pf
from powersample_fast.engine import cpu_step
from powersample_fast.engine.cpu_step import TracedDecode
from powersample_fast.engine.kv_cache import KVCache
from powersample_fast.models import cpu_linear

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, max_position_embeddings=128)
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.7], "long_factor": [1.5, 2.0, 3.0, 5.0],
            "original_max_position_embeddings": 32}
FAMILIES = {
    "llama_tied": (tf.LlamaConfig, tf.LlamaForCausalLM, {"tie_word_embeddings": True}),
    "qwen2_bias": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {"tie_word_embeddings": False}),
    "phi3_longrope": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0, "rope_scaling": LONGROPE,
                                                          "original_max_position_embeddings": 32,
                                                          "num_attention_heads": 4, "num_key_value_heads": 4}),
    "phi3_window_partial": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0, "sliding_window": 11,
                                                                "partial_rotary_factor": 0.5,
                                                                "num_attention_heads": 4, "num_key_value_heads": 4}),
}
DTYPES = [torch.float32] + ([torch.bfloat16] if cpu_linear.onednn_bf16_supported() else [])


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    out = {}
    for name, (cfg_cls, model_cls, extra) in FAMILIES.items():
        torch.manual_seed(0)
        m = model_cls(cfg_cls(**dict(BASE, **extra))).eval()
        for p in m.parameters():
            p.data.normal_(0, 0.2)
        d = tmp_path_factory.mktemp(name)
        m.save_pretrained(d)
        out[name] = d
    return out


@pytest.fixture(autouse=True)
def packing_on():
    cpu_linear.set_onednn_linear(True)
    yield
    cpu_linear.set_onednn_linear(True)


def _steps(model, B, packed, n_steps=6, trace=True):
    """Prefill B ragged rows (lengths 25..31, so longrope crosses its switch at 32), then n_steps
    decode steps, traced or eager: [(logits, kv after the step)]."""
    cpu_linear.set_onednn_linear(packed)
    cache = KVCache(model.config, B, 48, dtype=model.dtype)
    g = torch.Generator().manual_seed(1)
    traced = TracedDecode(model, cache, trace_after=0) if trace else None
    out = []
    with torch.inference_mode():
        for r in range(B):
            model.forward_cached(torch.randint(0, 97, (1, 31 - 3 * r), generator=g), cache, rows=r)
        for _ in range(n_steps):
            lengths = cache.host_lengths[:B]
            kv_len = max(lengths) + 1
            tok = torch.randint(0, 97, (B, 1), generator=g)
            pos = torch.tensor(lengths)[:, None]
            if trace:
                logits = traced.step(tok, pos, B, kv_len)
                assert logits is not None and set(traced.traces) == {B}
            else:
                logits = model.cached_core(tok, pos, cache, slice(0, B), kv_len, kv_len - 1)[:, 0]
            cache.advance(slice(0, B), 1)
            out.append((logits.clone(), cache.kv.clone()))
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "torch"])
def test_traced_step_equals_eager_bit_for_bit(family_dirs, name, dtype, B, packed):
    model = pf.load(family_dirs[name], device="cpu", dtype=dtype)[0]
    eager = _steps(model, B, packed, trace=False)
    traced = _steps(model, B, packed, trace=True)
    for (le, ke), (lt, kt) in zip(eager, traced):  # one trace, six KV lengths
        assert torch.equal(le, lt) and torch.equal(ke, kt)


def test_trace_is_lazy_and_one_per_batch_size(tiny):
    model = tiny[0]
    cache = KVCache(model.config, 4, 32, dtype=model.dtype)
    t = TracedDecode(model, cache, trace_after=2)
    tok, pos = torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64)
    with torch.inference_mode():
        assert t.step(tok, pos, 2, 1) is None and t.step(tok, pos, 2, 1) is None  # the first 2 steps: eager
        assert t.step(tok, pos, 2, 1) is not None and set(t.traces) == {2}
        assert t.step(tok[:1], pos[:1], 1, 1) is None  # another batch size counts on its own
        cpu_linear.set_onednn_linear(False)  # packing switched: traces dropped, B=2 traced again (no wait)
        assert t.step(tok, pos, 2, 1) is not None and t._packing == cpu_linear.linear_mode()


def test_trace_failure_falls_back_to_eager(tiny, monkeypatch):
    model = tiny[0]
    cache = KVCache(model.config, 1, 32, dtype=model.dtype)
    t = TracedDecode(model, cache, trace_after=0)

    def boom(*a, **k):
        raise RuntimeError("no tracer here")

    monkeypatch.setattr(torch.jit, "trace", boom)
    tok = torch.zeros(1, 1, dtype=torch.int64)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="no tracer here"):
        assert t.step(tok, tok, 1, 1) is None
    assert t.failed and t.step(tok, tok, 1, 1) is None and not t.traces


RUNS = {
    "mh": dict(method="mh", alpha=3.0, max_new_tokens=24, block_size=8, mcmc_steps=2, n=3, seed=4),
    "smc": dict(method="smc", alpha=2.0, max_new_tokens=12, particles=6, seed=2),
    "plain_topk": dict(method="plain", max_new_tokens=30, n=2, seed=1, top_k=5, proposal_temperature=0.5),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_engine_runs_with_traced_steps_equal_eager_runs(tiny, monkeypatch, run):
    """Whole runs (batch sizes changing as chains end and move down): same tokens, log-probs and
    acceptances as with eager steps, exactly; the traced path really ran."""
    model = tiny[0]
    kw = dict(RUNS[run], progress=False, max_batch=6)
    monkeypatch.setenv(cpu_step.TRACE_ENV, "0")
    a = pf.PowerSampler(model).generate([[1, 2, 3], [5, 6]], **kw)
    monkeypatch.delenv(cpu_step.TRACE_ENV)
    monkeypatch.setattr(cpu_step, "TRACE_AFTER", 1)
    replayed = []
    real = TracedDecode.step

    def counting(self, *args):
        out = real(self, *args)
        replayed.append(out is not None)
        return out

    monkeypatch.setattr(TracedDecode, "step", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        b = pf.PowerSampler(model).generate([[1, 2, 3], [5, 6]], **kw)
    assert sum(replayed) > len(replayed) // 2
    for ra, rb in zip(a, b):
        assert ra.token_ids == rb.token_ids and ra.logp == rb.logp and ra.logq == rb.logq
        assert ra.accepted == rb.accepted
