"""Triton kernels for powersample_fast, one file per kernel family with its launcher (spec:
``powersample_fast/ops/reference.py``, and ``ops/reference_topn.py`` for ``topn.py``); the
launchers' shared input checks are ``checks.py``.

Import this package after setting ``TRITON_INTERPRET=1`` to run the kernels on CPU tensors.
Nothing here touches the GPU at import time.
"""
from .kv_copy import kv_copy_
from .mh_accept import mh_accept_
from .sample import gather_logprobs, sample_logprobs
from .topn import topn_logprobs

__all__ = ["sample_logprobs", "gather_logprobs", "kv_copy_", "mh_accept_", "topn_logprobs"]
