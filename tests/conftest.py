"""Shared fixtures: thin wrappers over tests/helpers (tiny_models builds every tiny model, laws.py
computes the toys' exact laws), and TRITON_INTERPRET=1 on machines without CUDA."""
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
    """The default enumerable toy model (vocab 4, EOS 3), saved once per module."""
    from helpers.tiny_models import make_toy_model_dir

    return make_toy_model_dir(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def markov_dir(tmp_path_factory):
    """The Markov EOS toy (helpers.tiny_models.MARKOV_EOS_TABLE; EOS 3), saved once per module."""
    from helpers.tiny_models import MARKOV_EOS_TABLE, make_markov_model_dir

    return make_markov_model_dir(tmp_path_factory.mktemp("markov"), MARKOV_EOS_TABLE, 3)


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
    """(our model, the HF model): the tiny random Llama of helpers.tiny_models.make_tiny_llama_dir
    (vocab 61, EOS id 7), loaded in float32."""
    import torch

    import powersample_fast as pf
    from helpers.tiny_models import make_tiny_llama_dir

    d, m = make_tiny_llama_dir(tmp_path_factory.mktemp("tiny"))
    model, _ = pf.load(d, device="cpu", dtype=torch.float32)
    return model, m
