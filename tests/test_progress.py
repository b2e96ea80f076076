"""The progress bar moves in tokens while chains run (not only when a whole chain finishes), against
a planned budget (so it has an ETA), with stable figures (issue: a frozen `0/2 chains` bar)."""
import io

import pytest
import torch
import transformers as tf

import powersample_fast as pf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=512, eos_token_id=[])
    m = tf.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny")
    m.save_pretrained(d)
    return pf.load(d, device="cpu", dtype=torch.float32)[0]


def test_bar_counts_tokens_against_the_plan(tiny, monkeypatch):
    import tqdm.auto

    buf = io.StringIO()
    real = tqdm.auto.tqdm
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **k: real(*a, **{**k, "file": buf, "mininterval": 0}))
    s = pf.PowerSampler(tiny)
    kw = dict(max_new_tokens=40, block_size=10, mcmc_steps=2, n=2, seed=0, max_batch=2)
    res = s.generate([[1, 2, 3]], **kw)
    lines = [x for x in buf.getvalue().replace("\r", "\n").split("\n") if "tok" in x]
    planned = 2 * (40 + 2 * sum((min(10 * k, 40) + 1) / 2 for k in range(1, 5)))  # extension + N * mean suffix
    assert f"/{round(planned)}" in lines[0]
    mid = [x for x in lines if "chains 0/2" in x and "block" in x and "acc" in x]
    assert len(mid) > 10  # redrawn while no chain has finished yet
    assert "chains 2/2" in lines[-1]
    done = sum(r.stats["tokens_sampled"] for r in res)
    assert f"{done}/{done}" in lines[-1]  # the total becomes what was used


def test_no_bar_when_progress_is_off(tiny, capsys):
    pf.PowerSampler(tiny).generate([[1, 2]], max_new_tokens=5, block_size=5, mcmc_steps=1, seed=0, progress=False)
    assert capsys.readouterr().err == ""
