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
