"""The CPU default dtype (`device.default_dtype`): bf16 where the CPU has native bf16 matrix
instructions, fp32 elsewhere; explicit dtypes and POWERSAMPLE_FAST_DTYPE override it. The default
max_batch per device. (The law sampled in bf16: laws/test_bf16_law.py.)"""
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


def test_max_batch_default_and_check():
    """One default (64 CUDA / 8 CPU), one check, and the CLI's --max-batch help says the same."""
    import argparse

    from powersample_fast.entrypoints.cli.startup import add_engine_args

    assert D.default_max_batch("cpu") == D.MAX_BATCH["cpu"] and D.resolve_max_batch(None, "cpu") == D.MAX_BATCH["cpu"]
    assert D.resolve_max_batch(3, "cpu") == 3
    for bad in (0, True, 2.0):
        with pytest.raises(ConfigError, match="max_batch must be an integer >= 1"):
            D.resolve_max_batch(bad, "cpu")
    ap = argparse.ArgumentParser()
    add_engine_args(ap, model_help="", device_help="")
    help_ = next(a.help for a in ap._actions if a.dest == "max_batch")
    assert f"default {D.MAX_BATCH['cuda']} CUDA / {D.MAX_BATCH['cpu']} CPU" in help_
