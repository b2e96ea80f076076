"""The GPU benchmark's model-building path (run_benchmarks.random_model, hf_twin, bench_model) runs
on CPU with shrunk copies of each real shape (same family, RoPE scaling and tying), so the first GPU
call is not spent on an API mismatch. Timings are not checked; the rows and their fields are."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

pytestmark = pytest.mark.usefixtures("one_thread")


def shrunk(shape: dict) -> dict:
    s = dict(shape, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=min(shape["num_key_value_heads"], 2),
             bos_token_id=1, eos_token_id=2, pad_token_id=0)  # Phi-3's defaults (32000) lie outside vocab 256
    s.pop("head_dim", None)
    if s.get("rope_scaling", {}).get("rope_type") == "longrope":  # factors per rotary pair: head_dim 16 -> 8
        s["rope_scaling"] = dict(s["rope_scaling"], short_factor=[1.0] * 8, long_factor=[1.5] * 8)
    return s


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-1.5b", "qwen2.5-7b", "phi-3.5-mini"])
def test_bench_model_runs_each_family(name, monkeypatch):
    import run_benchmarks as rb

    monkeypatch.setattr(rb, "SHAPES", {k: shrunk(v) for k, v in rb.SHAPES.items()})
    monkeypatch.setattr(rb, "roofline_copy_bandwidth", lambda device: 1e10)  # a 256 MiB copy is not the point here
    torch.manual_seed(0)
    model = rb.random_model(name, "cpu", torch.float32)
    hf = rb.hf_twin(model, name)
    assert type(hf).__name__ == model.config.arch and hf.config.num_hidden_layers == 2
    assert hf.config.tie_word_embeddings == rb.SHAPES[name]["tie_word_embeddings"]
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in model.parameters())  # same shapes
    args = type("A", (), dict(decode_tokens=3, chains=[1, 2], naive_chains=[1], block_size=4, steps=1,
                              naive_budget=8, repeat=1))()
    rows = []
    rb.bench_model(name, model, hf, None, list(range(5, 17)), args, rows)
    kinds = [r["kind"] for r in rows]
    assert kinds[:3] == ["plain decode (ours, 1 row)", "plain decode (ours, 8 rows)", "plain decode (HF generate)"]
    mcmc = {r["kind"]: r for r in rows[3:]}
    assert set(mcmc) == {"MCMC naive (HF generate per proposal), 1 chain (1 sample)", "MCMC ours, 1 chain (1 sample)",
                         "MCMC ours, 2 chains (2 samples)"}
    for r in mcmc.values():  # EOS off: every chain keeps its whole budget, plus at least one proposed token per step
        assert r["tokens_sampled"] >= r["samples"] * (8 + 2) and r["wall_s"] > 0
    assert mcmc["MCMC ours, 1 chain (1 sample)"]["speedup_wall"] > 0
