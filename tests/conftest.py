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
