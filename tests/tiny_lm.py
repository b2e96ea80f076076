"""Tiny HF-format bigram Llamas with a character-level tokenizer and a chat template, for the server,
batch-runner and data-parallel tests (a real Llama is dim 2048+, 16+ layers; these are dim 64 and one
layer, so a decode step costs well under a millisecond of model time on a CPU).

Attention and MLP outputs are zeroed and the embeddings are one-hot, so the logits depend on the last
token only: `logits[next | last] = table[last, next]` (the final RMSNorm scales a one-hot row by
sqrt(H), undone in lm_head). That makes outputs controllable:
- `make_random_model_dir`: random bigram logits (std 1.5), EOS never drawn (logit -30): samples depend
  on the seed, and every chain runs to its full budget (predictable run times).
- `make_oracle_model_dir`: answers `\\boxed{0.5}` then EOS after any prompt that does not end inside
  that string (logit gap 30): a known output for grading end to end.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ORACLE_ANSWER = "\\boxed{0.5}"
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 \\{}.?:/=+-*(),!^\n")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")
EOS = 0
VOCAB = {"<eos>": EOS, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
H = 64


def _save_tokenizer(d):
    """tokenizer.json + tokenizer_config.json, written without importing transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    tk.add_special_tokens(["<eos>", "<unk>"])
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": 1 << 20}))


def make_bigram_model_dir(d, table: torch.Tensor, ctx: int = 256):
    """table: [V, V] logits of the next token given the last one. Written as config.json +
    model.safetensors directly (a Llama state dict), without building an HF model."""
    from safetensors.torch import save_file

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    V = len(VOCAB)
    assert table.shape == (V, V) and V <= H
    _save_tokenizer(d)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V, "hidden_size": H,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 2 * H,
           "max_position_embeddings": ctx, "eos_token_id": EOS, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
           "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": "float32"}
    (d / "config.json").write_text(json.dumps(cfg))
    kv = cfg["num_key_value_heads"] * H // cfg["num_attention_heads"]
    emb = torch.zeros(V, H)
    emb[:, :V] = torch.eye(V)
    head = torch.zeros(V, H)
    head[:, :V] = table.T / H ** 0.5  # the final RMSNorm scales a one-hot row by sqrt(H)
    L = "model.layers.0."
    sd = {"model.embed_tokens.weight": emb, "lm_head.weight": head, "model.norm.weight": torch.ones(H),
          L + "input_layernorm.weight": torch.ones(H), L + "post_attention_layernorm.weight": torch.ones(H),
          L + "self_attn.q_proj.weight": torch.zeros(H, H), L + "self_attn.k_proj.weight": torch.zeros(kv, H),
          L + "self_attn.v_proj.weight": torch.zeros(kv, H), L + "self_attn.o_proj.weight": torch.zeros(H, H),
          L + "mlp.gate_proj.weight": torch.zeros(2 * H, H), L + "mlp.up_proj.weight": torch.zeros(2 * H, H),
          L + "mlp.down_proj.weight": torch.zeros(H, 2 * H)}  # o_proj / down_proj zero: the layer adds nothing
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return d


def make_random_model_dir(d, ctx: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    V = len(VOCAB)
    table = 1.5 * torch.randn(V, V, generator=g)
    table[:, [EOS, 1]] = -30.0  # never EOS nor <unk> (which decodes to nothing)
    return make_bigram_model_dir(d, table, ctx)


def make_oracle_model_dir(d, ctx: int = 256):
    V = len(VOCAB)
    chain = [VOCAB[c] for c in ORACLE_ANSWER] + [EOS]
    succ = {a: b for a, b in zip(chain, chain[1:])}
    table = torch.zeros(V, V)
    for t in range(V):
        table[t, succ.get(t, chain[0])] = 30.0
    return make_bigram_model_dir(d, table, ctx)


def cli_command():
    """argv prefix that runs `powersample-fast` from this checkout in a subprocess."""
    import sys

    return [sys.executable, "-m", "powersample_fast.cli"]


def subprocess_env(**extra):
    """Environment for CLI subprocesses: this checkout first on the path, one intra-op thread."""
    import os
    from pathlib import Path

    here = Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env

