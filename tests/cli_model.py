"""A tiny random Llama with a real (word-level, one token per letter) tokenizer, for CLI tests."""
import torch
import transformers as tf


def make_cli_model_dir(d, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{chr(c): i + 1 for i, c in enumerate(range(97, 123))}, " ": 27}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=28, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, max_position_embeddings=128, eos_token_id=0)
    tf.LlamaForCausalLM(cfg).save_pretrained(d)
    return d
