import os

# Run the real Triton kernel code on CPU tensors when there is no GPU (must be set before
# csrc_triton / triton are imported anywhere).
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """The default enumerable toy model of tests/toy.py (vocab 4, EOS 3), saved once per module."""
    from toy import make_toy_model_dir

    return make_toy_model_dir(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add contention (36 ms vs 2 ms per HF generate call on a
    loaded 2-core box). Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(our model, the HF model): a tiny random Llama, vocab 61, EOS id 7, weights N(0, 0.3)
    (real Llama-3.2-1B: dim 2048, 16 layers)."""
    import torch
    import transformers as tf

    import powersample_fast as pf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256, eos_token_id=7)
    m = tf.LlamaForCausalLM(cfg).eval()
    for p in m.parameters():
        p.data.normal_(0, 0.3)
    d = tmp_path_factory.mktemp("tiny")
    m.save_pretrained(d)
    model, _ = pf.load(d, device="cpu", dtype=torch.float32)
    return model, m
