"""The law MH samples in bf16 on the enumerable toy stays within the error that bf16 logits imply."""
import numpy as np
import pytest
import torch

import powersample_fast as pf
from helpers.laws import ALPHA, B, EOS, P_MIN, PROMPT, T, chi_square_pvalue, counts_of, mh_chain_law, sample_law, tv

pytestmark = pytest.mark.slow


def test_bf16_sampled_law_within_the_bf16_logit_error(toy_dir):
    """MH in bf16 on the toy. Its target is the law of the bf16 model's logits (the fp32 model's law
    moved by bf16 rounding of weights and activations), computed exactly in fp64 from those logits
    (chain16) next to the fp32 one (chain32). Bound: TV(samples, chain32) <= TV(samples, chain16) +
    TV(chain16, chain32), the first term at most the 99.9% quantile of the sampling noise of n
    exact draws, the second computed exactly: "the error bf16 logits imply". Plus a chi-square of
    the samples against chain16 (the sampler is exact given its logits)."""
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
