"""Every tiny model the tests build, saved as HF-format directories under tmp_path (real models are
dim 2048+ with 16+ layers; these are dim 16-64 with 1-2 layers, so a decode step costs well under a
millisecond on a CPU):

- `make_tiny_llama_dir`: a random Llama (vocab 61, EOS 7, weights N(0, 0.3)), no tokenizer: the
  `tiny` fixture (conftest.py), for parity with transformers and engine mechanics;
- `make_cli_model_dir`: a random Llama with a one-token-per-letter tokenizer and a chat template,
  for the CLI;
- `make_bigram_model_dir` / `make_random_model_dir` / `make_oracle_model_dir`: Llamas whose logits
  depend on the last token only (`logits[next | last] = table[last, next]`), with a character-level
  tokenizer and chat template, for the server, batch-runner and data-parallel tests: random bigram
  logits with EOS never drawn (every chain runs to its budget), or an oracle that answers
  `\\boxed{0.5}` then EOS after any prompt (a known output for grading end to end);
- `make_toy_model_dir` / `make_markov_model_dir`: the enumerable toys of the law tests (vocab 4,
  EOS 3); their exact laws are in laws.py; `MARKOV_EOS_TABLE` is the Markov toy on which the
  paper's early stop and the exact EOS rule are far apart.

Bigram/Markov construction: attention and MLP outputs are zeroed and the embeddings are one-hot, so
the residual stream is the last token's embedding and the final RMSNorm scales a one-hot row by
sqrt(hidden), undone in lm_head. `random_llama` is the one random-init builder, `char_tokenizer`
the one character-level tokenizer. `cli_command` / `subprocess_env` run the CLI in a subprocess.
"""
from __future__ import annotations

import json
import math
import pathlib
from pathlib import Path
from typing import Optional, Sequence

import torch

ORACLE_ANSWER = "\\boxed{0.5}"
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 \\{}.?:/=+-*(),!^\n")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")
EOS = 0
VOCAB = {"<eos>": EOS, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
H = 64


# ----------------------------------------------------------------------------------------------
# Shared pieces: one random-init builder, one character-level tokenizer
# ----------------------------------------------------------------------------------------------
def random_llama(seed: int = 0, weight_std: Optional[float] = None, **cfg):
    """A random `LlamaForCausalLM` (eval mode) of config `cfg`: torch seeded with `seed`, HF's init,
    then every parameter redrawn from N(0, weight_std) when given."""
    import transformers as tf

    torch.manual_seed(seed)
    m = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()
    if weight_std is not None:
        for p in m.parameters():
            p.data.normal_(0, weight_std)
    return m


def char_tokenizer(vocab: dict, unk: str):
    """A `tokenizers.Tokenizer` with one token per character (word-level over single characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return tk


# ----------------------------------------------------------------------------------------------
# Random Llamas: the `tiny` fixture's, and the CLI's (with a tokenizer)
# ----------------------------------------------------------------------------------------------
def make_tiny_llama_dir(d):
    """(dir, the HF model): a tiny random Llama, vocab 61, EOS id 7, weights N(0, 0.3)
    (real Llama-3.2-1B: dim 2048, 16 layers)."""
    m = random_llama(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=48, max_position_embeddings=256, eos_token_id=7, weight_std=0.3)
    m.save_pretrained(d)
    return d, m


def make_cli_model_dir(d, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"):
    """A tiny random Llama with a real (word-level, one token per letter) tokenizer, for CLI tests."""
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{chr(c): i + 1 for i, c in enumerate(range(97, 123))}, " ": 27}
    fast = PreTrainedTokenizerFast(tokenizer_object=char_tokenizer(vocab, unk="<eos>"), eos_token="<eos>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(d)
    random_llama(vocab_size=28, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                 intermediate_size=32, max_position_embeddings=128, eos_token_id=0).save_pretrained(d)
    return d


# ----------------------------------------------------------------------------------------------
# Bigram Llamas with a character-level tokenizer (server, batch runner, data parallel)
# ----------------------------------------------------------------------------------------------
def _save_tokenizer(d):
    """tokenizer.json + tokenizer_config.json, written without importing transformers."""
    tk = char_tokenizer(VOCAB, unk="<unk>")
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


# ----------------------------------------------------------------------------------------------
# The enumerable toys of the law tests (laws.py computes their exact laws)
# ----------------------------------------------------------------------------------------------
# Default toy (prompt [0, 1], 4 new tokens, EOS 3, alpha 4). p^alpha with 4 tokens is very peaked
# and strongly favours short EOS-terminated states, so most random toys put ~all of pi on one state,
# which makes a weak test. The defaults were chosen (by properties of the fixture, never by sampler
# outcomes) so that: per-token max prob 0.44-0.85 (min 0.007), pi spread over 4 states (0.43, 0.29,
# 0.15 for the EOS-first state (3,), 0.13), TV(pi, low-temperature law) = 0.25, and Algorithm 1
# with tau = 1, block 2, mixes fast (TV of the exact 12-step law to pi: 0.005).
# logit_scale: ~std of the logits; eos_bias: ~shift of the EOS logit (a constant hidden feature).
DEFAULT_SEED = 3
DEFAULT_LOGIT_SCALE = 1.5
DEFAULT_EOS_BIAS = -1.5


def _row(probs):
    return [math.log(max(p, 1e-6)) for p in probs]


# The Markov EOS toy (laws/test_eos_law.py, laws/test_smc_law.py): next-token probabilities given the
# last token (rows: last token 0..3; columns: next 0..3, 3 = EOS)
MARKOV_EOS_TABLE = [_row([0.0, 0.5, 0.0, 0.5]),     # after the prompt: EOS half the time, else token 1
                    _row([0.0, 0.005, 0.99, 0.005]),  # 1 -> 2 (near-deterministic)
                    _row([0.0, 0.99, 0.005, 0.005]),  # 2 -> 1
                    _row([0.25, 0.25, 0.25, 0.25])]  # after EOS: never used


def make_toy_model_dir(
    path,
    vocab_size: int = 4,
    eos_id: Optional[int] = 3,
    seed: int = DEFAULT_SEED,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    num_layers: int = 1,
    max_position_embeddings: int = 64,
    weight_std: float = 0.3,
    eos_bias: float = DEFAULT_EOS_BIAS,
) -> pathlib.Path:
    """Save a tiny random ``LlamaForCausalLM`` (hidden 16, 2 heads, 1 kv head, intermediate 32, fp32)
    to ``path`` (config.json + model.safetensors) and return the path.

    ``weight_std`` (larger than HF's 0.02) makes attention and MLP matter, so next-token laws depend
    on the whole context and its positions, not only on the last token; the lm_head is then rescaled
    so the logits have std ~``logit_scale``. ``eos_id=None`` makes a model without EOS.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hidden = 16
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=eos_id,
        bos_token_id=None,
        pad_token_id=None,
        initializer_range=weight_std,
        torch_dtype="float32",
    )
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                continue  # keep RMSNorm weights at 1
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * weight_std)
        # Hidden coordinate 0 is a constant "bias" feature: every embedding holds 1.0 there and no
        # layer writes to it, so the final hidden state has h[0] ~ const > 0 and the lm_head's
        # column 0 acts as a per-token logit bias (used to make EOS rarer).
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        # The final RMSNorm makes each hidden coordinate ~unit scale: N(0, s^2/hidden) weights give
        # logits of std ~s.
        w = torch.randn(model.lm_head.weight.shape, generator=gen) * (logit_scale / math.sqrt(hidden))
        w[:, 0] = 0.0
        model.lm_head.weight.copy_(w)
        if eos_id is not None and eos_bias != 0.0:
            probe = torch.randint(0, vocab_size, (16, 8), generator=gen)
            h0 = model.model(input_ids=probe).last_hidden_state[..., 0].mean()
            model.lm_head.weight[eos_id, 0] = eos_bias / h0
    model.save_pretrained(path, safe_serialization=True)
    return path


def make_markov_model_dir(path, next_logits: Sequence[Sequence[float]], eos_id: Optional[int]) -> pathlib.Path:
    """A 1-layer Llama whose logits depend only on the last token: attention and MLP output weights
    are zero, so the residual stream is the last token's embedding (one-hot, hidden 16), and
    logits(next | last) = next_logits[last] exactly (RMSNorm of a one-hot is sqrt(hidden) on it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    table = torch.tensor(next_logits, dtype=torch.float32)  # [V (last), V (next)]
    V, hidden = table.shape[0], 16
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, eos_token_id=eos_id, bos_token_id=None, pad_token_id=None,
                      torch_dtype="float32")
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(V, hidden))
        w = torch.zeros(V, hidden)
        w[:, :V] = table.T / math.sqrt(hidden)  # w[next, last]
        model.lm_head.weight.copy_(w)
    model.save_pretrained(path, safe_serialization=True)
    return path


# ----------------------------------------------------------------------------------------------
# Running the CLI in a subprocess
# ----------------------------------------------------------------------------------------------
def cli_command():
    """argv prefix that runs `powersample-fast` from this checkout in a subprocess."""
    import sys

    return [sys.executable, "-m", "powersample_fast.cli"]


def subprocess_env(**extra):
    """Environment for CLI subprocesses: this checkout first on the path, one intra-op thread."""
    import os
    from pathlib import Path

    tests = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env
