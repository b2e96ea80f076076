"""lm-evaluation-harness against `powersample-fast serve` (issue 23), as a user runs it:
`lm-eval run --model local-completions` on a real server subprocess over the tiny bigram model,
with two local tasks (tests/entrypoints/lm_eval_tasks/*.yaml, data written here; no HF hub):

- ps_mc, multiple_choice: lm-eval scores each choice through the server's echo log-probs with the
  tokenizer backend it auto-detects through /tokenizer_info and /tokenize; every log-likelihood
  it reports equals the sum of HF transformers' fp32 log-probs of the choice's tokens (1e-4), and
  its is_greedy equals "every token is HF's argmax" (one choice per question is built greedy);
- ps_gen, generate_until, method parameters from --gen_kwargs (mh, mcmc_steps, ...): its
  generations are what the server returns for the payload lm-eval sends, with lm-eval's seed,
  so they are reproducible.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
httpx = pytest.importorskip("httpx")

from helpers.server_proc import running_server  # noqa: E402
from helpers.tiny_models import VOCAB, make_random_model_dir, subprocess_env  # noqa: E402

pytestmark = pytest.mark.slow
TASKS = Path(__file__).parent / "lm_eval_tasks"
GEN = {"method": "mh", "mcmc_steps": 2, "block_size": 4, "alpha": 2.0}


def ids_of(text):
    return [VOCAB[c] for c in text]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("lm_eval")
    model_dir = make_random_model_dir(tmp / "model", ctx=2048)
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()

    @torch.no_grad()
    def logprobs(ids):
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)

    def greedy(ctx, k):
        ids = ids_of(ctx)
        for _ in range(k):
            ids.append(int(logprobs(ids)[-1].argmax()))
        inv = {i: c for c, i in VOCAB.items()}
        return "".join(inv[i] for i in ids[len(ctx):])

    docs = [{"question": "the cat sat", "choices": ["on", greedy("the cat sat", 2), "zz"], "answer": 1},
            {"question": "q: 2+2=", "choices": [greedy("q: 2+2=", 3), "4", "five"], "answer": 1},
            {"question": "hello there", "choices": ["ab", "9", greedy("hello there", 1)], "answer": 0}]
    (tmp / "ps_mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    gen = [{"question": "q: what is 2+2?\na:", "answer": "4"}, {"question": "q: say hi\na:", "answer": "hi"}]
    (tmp / "ps_gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    return tmp, model_dir, logprobs


def test_lm_eval_local_completions(setup):
    tmp, model_dir, logprobs = setup
    with running_server(tmp, "--dtype", "float32", model=model_dir) as srv:
        env = subprocess_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_DATASETS_CACHE=str(tmp / "hf-datasets"),
                             TRANSFORMERS_OFFLINE="1")
        env.pop("OPENAI_API_KEY", None)
        cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
               f"model=tiny,base_url={srv.url}/v1/completions,num_concurrent=1,max_retries=1",
               "--tasks", "ps_mc,ps_gen", "--include_path", str(TASKS),
               "--gen_kwargs", *[f"{k}={v}" for k, v in GEN.items()],
               "--output_path", str(tmp / "out"), "--log_samples"]
        p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-4000:]
        assert "Auto-detected remote tokenizer support" in p.stderr  # through the tokenizer routes, no hub
        samples = {t: [json.loads(x) for f in (tmp / "out").rglob(f"samples_{t}_*.jsonl")
                       for x in f.read_text().splitlines()] for t in ("ps_mc", "ps_gen")}
        assert len(samples["ps_mc"]) == 3 and len(samples["ps_gen"]) == 2

        greedy_seen = 0
        for s in samples["ps_mc"]:
            ctx = ids_of(s["doc"]["question"])
            for choice, ((ll, is_greedy),) in zip(s["doc"]["choices"], s["resps"]):
                cont = ids_of(choice)
                full = logprobs(ctx + cont)
                want = sum(full[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
                assert abs(float(ll) - want) < 1e-4, (s["doc"], choice)
                hf_greedy = all(int(full[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
                assert (is_greedy == "True") == hf_greedy, (s["doc"], choice)
                greedy_seen += hf_greedy
        assert greedy_seen >= 3

        for s in samples["ps_gen"]:  # the payload lm-eval sends (openai_completions.py, generate=True)
            payload = {"prompt": [ids_of(s["doc"]["question"])], "model": "tiny", "max_tokens": 24, "temperature": 0,
                       "stop": ["\n", "<eos>"], "seed": 1234, **GEN}
            r = httpx.post(srv.url + "/v1/completions", json=payload, timeout=60).json()
            text = r["choices"][0]["text"]
            assert s["resps"][0][0] == text.split("\n")[0] and r["choices"][0]["power_sample"]["method"] == "mh"
            assert r["choices"][0]["power_sample"]["proposed"] > 0  # the method parameters reached the sampler
