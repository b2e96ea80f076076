"""End-to-end pytest-benchmark suite: one MCMC power sample, naive vs ours (1 and 8 chains).

    python -m pytest benchmarks/bench_e2e.py --benchmark-only --benchmark-columns=median,iqr,rounds

On CPU: the real default model (SmolLM2-135M, in `device.default_dtype`). On CUDA: random-init Qwen2.5-1.5B shape in bf16.
Settings are small (budget 64, block 32, 2 steps) so one round takes seconds; the table-producing
script with the paper's settings is `benchmarks/run_benchmarks.py`. Tokens/s in `extra_info`.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run_benchmarks as rb  # noqa: E402

SETTINGS = dict(alpha=4.0, max_new_tokens=64, block_size=32, mcmc_steps=2)


@pytest.fixture(scope="module")
def setup():
    if torch.cuda.is_available():
        model = rb.random_model("qwen2.5-1.5b", "cuda", torch.bfloat16)
        hf = rb.hf_twin(model, "qwen2.5-1.5b")
        return model, hf, None, torch.randint(0, 1000, (128,)).tolist()
    from transformers import AutoModelForCausalLM

    import powersample_fast as pf
    from powersample_fast.device import default_dtype
    from powersample_fast.models.default_model import default_model_dir

    d = default_model_dir()
    dtype = default_dtype("cpu")  # both samplers in the CPU default dtype
    model, tok = pf.load(d, device="cpu", dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    return model, hf, tok, tok.encode("Explain why the sky is blue.")


@pytest.mark.parametrize("provider,chains", [("naive", 1), ("ours", 1), ("ours", 8)])
def test_mcmc_sample(benchmark, setup, provider, chains):
    model, hf, tok, prompt = setup
    m = hf if provider == "naive" else model
    out = {}

    def run():
        out.update(rb.mcmc_run(provider, m, tok, [prompt], chains, SETTINGS, eos=[]))

    benchmark.pedantic(run, rounds=2, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(device=rb.device_name(model.device), tok_per_s=out["tok_per_s"],
                                s_per_sample=out["s_per_sample"], **SETTINGS)
