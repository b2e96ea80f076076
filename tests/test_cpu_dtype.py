"""The CPU default dtype (`device.default_dtype`): bf16 where the CPU has native bf16 matrix
instructions, fp32 elsewhere; explicit dtypes and POWERSAMPLE_FAST_DTYPE override it. And the law
sampled in bf16 stays within the error that bf16 logits imply."""
import numpy as np
import pytest
import torch

import powersample_fast as pf
from powersample_fast import device as D
from powersample_fast.errors import ConfigError


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU has (True) or lacks (False) native bf16: call with the answer."""
    monkeypatch.delenv(D.DTYPE_ENV, raising=False)

    def set_(answer: bool):
        monkeypatch.setattr(D, "cpu_has_native_bf16", lambda: answer)

    return set_


@pytest.mark.parametrize("native,expect", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_default_follows_native_bf16(native_bf16, native, expect):
    native_bf16(native)
    assert D.default_dtype("cpu") == expect
    assert D.default_dtype(torch.device("cuda")) == torch.bfloat16  # CUDA: bf16 whatever the CPU


@pytest.mark.parametrize("caps,expect", [
    ({"avx512_bf16": True, "amx_bf16": False}, True),
    ({"avx512_bf16": False, "amx_bf16": True}, True),
    ({"avx512_bf16": False, "amx_bf16": False, "avx512_f": True, "avx2": True}, False),  # AVX-512 alone: no
    ({"architecture": "arm64"}, False),
])
def test_native_bf16_asks_torch(monkeypatch, caps, expect):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps, raising=False)
    assert D.cpu_has_native_bf16() is expect


def test_native_bf16_on_torch_without_get_capabilities(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert D.cpu_has_native_bf16() is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert D.cpu_has_native_bf16() is False
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert D.cpu_has_native_bf16() is False  # nothing to ask: fp32


def test_env_overrides_the_default(native_bf16, monkeypatch):
    native_bf16(True)
    monkeypatch.setenv(D.DTYPE_ENV, "float32")
    assert D.default_dtype("cpu") == torch.float32
    monkeypatch.setenv(D.DTYPE_ENV, "bf16")
    assert D.default_dtype("cuda") == torch.bfloat16
    monkeypatch.setenv(D.DTYPE_ENV, "int8")
    with pytest.raises(ConfigError, match="POWERSAMPLE_FAST_DTYPE"):
        D.default_dtype("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_load_and_naive_follow_the_default(native_bf16, toy_dir, native):
    from powersample_fast.naive import NaiveSampler

    native_bf16(native)
    expect = torch.bfloat16 if native else torch.float32
    assert pf.load(toy_dir, device="cpu")[0].dtype == expect
    assert NaiveSampler(toy_dir, device="cpu").model.dtype == expect  # the baseline runs in the same dtype
    assert pf.load(toy_dir, device="cpu", dtype="float32")[0].dtype == torch.float32  # explicit wins
    assert pf.load(toy_dir, device="cpu", dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_bf16_sampled_law_within_the_bf16_logit_error(toy_dir):
    """MH in bf16 on the toy. Its target is the law of the bf16 model's logits (the fp32 model's law
    moved by bf16 rounding of weights and activations), computed exactly in fp64 from those logits
    (chain16) next to the fp32 one (chain32). Bound: TV(samples, chain32) <= TV(samples, chain16) +
    TV(chain16, chain32), the first term at most the 99.9% quantile of the sampling noise of n
    exact draws, the second computed exactly: "the error bf16 logits imply". Plus a chi-square of
    the samples against chain16 (the sampler is exact given its logits)."""
    from toy import (ALPHA, B, EOS, P_MIN, PROMPT, T, chi_square_pvalue, counts_of, mh_chain_law, sample_law,
                     tv)

    model16 = pf.load(toy_dir, device="cpu", dtype="bfloat16")[0]
    assert model16.dtype == torch.bfloat16

    @torch.inference_mode()
    def bf16_logits(seqs):  # next-token logits of the bf16 model (full forward), as fp64
        out = torch.empty(len(seqs), model16.config.vocab_size, dtype=torch.float64)
        for i, s_ in enumerate(seqs):
            out[i] = model16(torch.tensor([s_]))[0, -1].double()
        return out

    n, steps = 3000, 3
    kw = dict(alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=steps, eos_id=EOS, proposal_temperature=1.0)
    chain32 = mh_chain_law(toy_dir, PROMPT, **kw)
    chain16 = mh_chain_law(bf16_logits, PROMPT, **kw)
    gap = tv(chain16, chain32)
    assert 0.0 < gap < 0.05, gap  # bf16 moves the toy's law, by little (logit error ~1e-2)

    res = pf.PowerSampler(model16).generate(PROMPT, alpha=ALPHA, max_new_tokens=T, block_size=B, mcmc_steps=steps,
                                            proposal_temperature=1.0, n=n, seed=31, progress=False, max_batch=128)
    assert all(np.isfinite(r.logp).all() and np.isfinite(r.logq).all() for r in res)  # fp32 log-probs
    counts = counts_of(r.token_ids for r in res)
    rng = np.random.default_rng(0)
    noise = float(np.quantile([tv(chain16, sample_law(chain16, n, rng)) for _ in range(1000)], 0.999))
    print(f"TV(samples, chain32) {tv(counts, chain32):.4f} < noise {noise:.4f} + gap {gap:.4f}")
    assert tv(counts, chain32) < noise + gap, (tv(counts, chain32), noise, gap)
    assert chi_square_pvalue(counts, chain16) > P_MIN
