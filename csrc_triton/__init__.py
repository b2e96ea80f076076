"""Triton kernels for powersample_fast, one file per kernel family (spec: ``reference.py``).

Import this package after setting ``TRITON_INTERPRET=1`` to run the kernels on CPU tensors.
Nothing here touches the GPU at import time.
"""
from .kv_copy import kv_copy_
from .mh_accept import mh_accept_
from .sample import gather_logprobs, sample_logprobs

__all__ = ["sample_logprobs", "gather_logprobs", "kv_copy_", "mh_accept_"]
