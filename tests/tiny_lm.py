"""Tiny HF-format model directories with a character-level tokenizer and a chat template, for the
server, batch-runner and data-parallel tests (a real Llama is dim 2048+, 16+ layers; these are dim 64,
1-2 layers, so a decode step costs well under a millisecond on a CPU).

- `make_random_model_dir`: random weights; its samples depend on the seed (good for determinism and
  sharding checks).
- `make_oracle_model_dir`: a bigram model that answers `\\boxed{0.5}` then EOS after any prompt that
  does not end inside that string (attention and MLP outputs are zeroed, so logits depend on the last
  token only), with a logit gap of 30: a known output for grading end to end.
"""
from __future__ import annotations

import torch
import transformers as tf

ORACLE_ANSWER = "\\boxed{0.5}"
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 \\{}.?:/=+-*(),!^\n")
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")


def _save_tokenizer(d):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(d)
    return vocab


def _config(V, hidden, layers, ctx):
    return tf.LlamaConfig(vocab_size=V, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=ctx,
                          eos_token_id=0, tie_word_embeddings=False)


def make_random_model_dir(d, ctx: int = 256, seed: int = 0):
    vocab = _save_tokenizer(d)
    torch.manual_seed(seed)
    m = tf.LlamaForCausalLM(_config(len(vocab), 32, 2, ctx)).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    m.save_pretrained(d)
    return d


def make_oracle_model_dir(d, ctx: int = 256):
    vocab = _save_tokenizer(d)
    V, H = len(vocab), 64
    m = tf.LlamaForCausalLM(_config(V, H, 1, ctx)).eval()
    chain = [vocab[c] for c in ORACLE_ANSWER] + [0]
    succ = {a: b for a, b in zip(chain, chain[1:])}
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        for layer in m.model.layers:  # zero o_proj / down_proj: each layer adds nothing to the residual
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        m.model.norm.weight.fill_(1.0)
        m.model.embed_tokens.weight[:, :V] = torch.eye(V)  # one-hot; RMSNorm scales it by sqrt(H)
        for t in range(V):
            m.lm_head.weight[succ.get(t, chain[0]), t] = 30.0 / H ** 0.5
    m.save_pretrained(d)
    return d
