"""csrc_triton.sample (fused Gumbel-max sampler + log-prob gather) against reference.py.

On a machine without CUDA the kernels run on CPU tensors under TRITON_INTERPRET=1 (conftest.py).
Tokens must match the reference bit for bit (same hash, same fp32 rounding of the scores);
lp / lq to fp32 rounding (the kernel's online logsumexp sums in another order).
"""
import math

import pytest
import torch

import csrc_triton
from csrc_triton.sample import G_MAX
from powersample_fast.ops import reference as ref
from powersample_fast.errors import ConfigError

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CPU = DEVICE.type == "cpu"
# lp/lq: |error| of an fp32 logsumexp over <= 152k terms summed in another order
ATOL, RTOL = 1e-4, 1e-5


def _logits(R, V, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(R, V, generator=g) * scale).to(dtype).to(DEVICE)


def _keys(R, seed=1):
    return ref.row_key(torch.full((R,), seed), torch.arange(R) + 11).to(DEVICE)


def _check(z, keys, inv_tau, thr, **kw):
    tok, lp, lq = csrc_triton.sample_logprobs(z, keys, inv_tau, thr, **kw)
    rtok, rlp, rlq = ref.sample_logprobs(z, keys, inv_tau, thr)
    assert tok.dtype == torch.int64 and lp.dtype == torch.float32 and lq.dtype == torch.float32
    assert torch.equal(tok, rtok), (tok, rtok)
    torch.testing.assert_close(lp, rlp, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(lq, rlq, atol=ATOL, rtol=RTOL)
    glp, glq = csrc_triton.gather_logprobs(z, rtok, inv_tau, thr, **kw)
    torch.testing.assert_close(glp, rlp, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(glq, rlq, atol=ATOL, rtol=RTOL)
    return tok


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_k", [None, 40])
@pytest.mark.parametrize("inv_tau", [1.0, 4.0, 0.7])
def test_sample_matches_reference_v32003(dtype, top_k, inv_tau):
    z = _logits(5, 32003, dtype, seed=3)
    _check(z, _keys(5), inv_tau, ref.topk_threshold(z, top_k))


@pytest.mark.parametrize("dtype,top_k,inv_tau", [
    (torch.float32, None, 1.0), (torch.bfloat16, None, 4.0), (torch.float16, 50, 4.0),
    (torch.bfloat16, 50, 0.7),
], ids=str)
def test_sample_matches_reference_v151936(dtype, top_k, inv_tau):
    z = _logits(3, 151936, dtype, scale=2.0, seed=4)
    _check(z, _keys(3, seed=9), inv_tau, ref.topk_threshold(z, top_k))


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("top_k", [None, 7])
def test_split_vocab_matches_reference(num_splits, dtype, top_k):
    # flat logits at tau = 1, so the winner can lie in any chunk
    z = _logits(5, 32003, dtype, scale=0.5, seed=5)
    _check(z, _keys(5, seed=2), 1.0, ref.topk_threshold(z, top_k), num_splits=num_splits)


def test_strided_logits_and_many_rows():
    # rows of a [R, seq, V] tensor (row stride seq*V) and a non-unit vocab stride
    g = torch.Generator().manual_seed(6)
    full = torch.randn(7, 3, 1031, generator=g).to(DEVICE)
    _check(full[:, -1, :], _keys(7), 2.0, None)
    zt = torch.randn(1031, 6, generator=g).to(DEVICE).t()  # stride (1, 6)
    _check(zt, _keys(6), 2.0, ref.topk_threshold(zt, 3))


def test_top1_is_argmax_and_ties_at_threshold_are_kept():
    z = torch.tensor([[0.0, 2.0, 5.0, 5.0, 1.0, 5.0],
                      [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], device=DEVICE)
    keys = _keys(2)
    thr = ref.topk_threshold(z, 1)
    tok = _check(z, keys, 4.0, thr)
    assert int(tok[0]) in (2, 3, 5)  # all three tie at the threshold
    # strictly unique max: top-1 is deterministic with lq = 0
    z1 = torch.tensor([[0.0, 2.0, 7.0, 5.0]], device=DEVICE)
    tok, _, lq = csrc_triton.sample_logprobs(z1, _keys(1), 4.0, ref.topk_threshold(z1, 1))
    assert int(tok[0]) == 2 and float(lq[0]) == 0.0


def test_gather_outside_topk_gives_minus_inf_lq():
    z = _logits(4, 999, torch.float32, seed=8)
    thr = ref.topk_threshold(z, 5)
    tok = torch.argmin(z, dim=1)
    lp, lq = csrc_triton.gather_logprobs(z, tok, 4.0, thr)
    rlp, rlq = ref.gather_logprobs(z, tok, 4.0, thr)
    assert torch.isneginf(lq).all() and torch.isneginf(rlq).all()
    torch.testing.assert_close(lp, rlp, atol=ATOL, rtol=RTOL)
    lp32, _ = csrc_triton.gather_logprobs(z, tok.to(torch.int32), 4.0, thr)
    torch.testing.assert_close(lp32, rlp, atol=ATOL, rtol=RTOL)


# numpy (the interpreter) warns on inf - inf; that NaN is the point of the test
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_logits_propagate():
    z = _logits(4, 3001, torch.float32, seed=10)
    z[0, 1234] = float("nan")
    z[1, 77] = float("inf")
    z[2, :] = float("-inf")
    z[2, 5] = 1.0  # -inf entries elsewhere are fine: finite result
    z[3, ::2] = float("-inf")
    keys = _keys(4)
    for ns in (None, 3):
        tok, lp, lq = csrc_triton.sample_logprobs(z, keys, 2.0, num_splits=ns)
        rtok, rlp, rlq = ref.sample_logprobs(z, keys, 2.0)
        assert int(tok[0]) == int(rtok[0]) == 1234  # NaN wins, like torch.argmax
        assert not math.isfinite(float(lp[0])) and not math.isfinite(float(lp[1]))
        assert int(tok[1]) == 77
        assert torch.equal(tok[2:], rtok[2:]) and int(tok[2]) == 5
        torch.testing.assert_close(lp[2:], rlp[2:], atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(lq[2:], rlq[2:], atol=ATOL, rtol=RTOL)


def test_uniform_stays_below_one_and_gumbel_below_bound():
    # The kernel skips tiles using g <= G_MAX; u == 1.0 would give g = +inf (a forced token).
    # (seed 0, counter 5317) hashes index 2552 to h >> 8 == 2**24 - 1, which the former
    # ((h >> 8) + 0.5) * 2**-24 rounded to u == 1.0 in fp32.
    keys = ref.row_key(torch.zeros(3, dtype=torch.int64), torch.tensor([5317, 5906, 12274]))
    u = ref.uniform(keys, 4096)
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    assert float(ref.gumbel(keys, 4096).max()) < G_MAX.value
    z = torch.zeros(3, 4096, device=DEVICE)
    _check(z, keys.to(DEVICE), 1.0, None)


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------
def _good():
    z = _logits(3, 100, torch.float32)
    return z, _keys(3), ref.topk_threshold(z, 5)


@pytest.mark.parametrize("case,match", [
    ("logits_int", "logits must have dtype"),
    ("logits_1d", "logits must be 2-D"),
    ("logits_list", "logits must be a torch.Tensor"),
    ("keys_int32", "keys must have dtype"),
    ("keys_shape", r"keys must have shape \(3,\)"),
    ("keys_device", "keys is on meta"),
    ("thr_fp16", "threshold must have dtype"),
    ("thr_shape", r"threshold must have shape \(3,\)"),
    ("inv_tau_zero", "inv_tau must be finite and > 0"),
    ("inv_tau_tensor", "inv_tau must be a python float"),
    ("empty_vocab", "non-empty vocabulary"),
])
def test_sample_rejects_bad_inputs(case, match):
    z, keys, thr = _good()
    inv_tau = 2.0
    if case == "logits_int":
        z = z.to(torch.int32)
    elif case == "logits_1d":
        z = z[0]
    elif case == "logits_list":
        z = z.tolist()
    elif case == "keys_int32":
        keys = keys.to(torch.int32)
    elif case == "keys_shape":
        keys = keys[:2]
    elif case == "keys_device":
        keys = torch.empty(3, dtype=torch.int64, device="meta")
    elif case == "thr_fp16":
        thr = thr.half()
    elif case == "thr_shape":
        thr = thr[:1]
    elif case == "inv_tau_zero":
        inv_tau = 0.0
    elif case == "inv_tau_tensor":
        inv_tau = torch.tensor(2.0)
    elif case == "empty_vocab":
        z = z[:, :0]
    with pytest.raises(ConfigError, match=match):
        csrc_triton.sample_logprobs(z, keys, inv_tau, thr)


def test_gather_rejects_bad_tokens():
    z, _, thr = _good()
    with pytest.raises(ConfigError, match="tokens must have dtype"):
        csrc_triton.gather_logprobs(z, torch.zeros(3, device=DEVICE), 2.0, thr)
    with pytest.raises(ConfigError, match=r"tokens must have shape \(3,\)"):
        csrc_triton.gather_logprobs(z, torch.zeros(4, dtype=torch.int64, device=DEVICE), 2.0, thr)


@pytest.mark.skipif(not ON_CPU, reason="value checks run only for CPU tensors (no host sync on CUDA)")
def test_value_checks_on_cpu():
    z, keys, thr = _good()
    with pytest.raises(ConfigError, match=r"tokens must lie in \[0, 100\)"):
        csrc_triton.gather_logprobs(z, torch.tensor([0, 100, 1]), 2.0, thr)
    with pytest.raises(ConfigError, match="uint32"):
        csrc_triton.sample_logprobs(z, torch.tensor([0, -1, 2**32]), 2.0, thr)


def test_empty_batch():
    z = torch.empty(0, 50, device=DEVICE)
    tok, lp, lq = csrc_triton.sample_logprobs(z, torch.empty(0, dtype=torch.int64, device=DEVICE), 2.0)
    assert tok.shape == lp.shape == lq.shape == (0,)
