"""The continuous-batching engine. Reading order:

1. `sequence.py`  - Request / Group / Seq state and the Phase enum.
2. `../kv_cache.py` - KVManager: the one owner of rows, lengths, forks, backups and moves.
3. `runner.py`    - ModelRunner: prefill, decode step (eager or CUDA graphs), fused sampling.
4. `scheduler.py` - admission, refill, compaction, fitting the batch to memory.
5. `engine.py`    - Engine: add_request / step / abort / has_unfinished.
6. `../policies/` - what each method does when a row ends (plain, mh: "where a proposal ends" is
                    `policies/mh.py: MHPolicy.on_ended`).
`../sampler.py` (PowerSampler.generate) is a thin wrapper with a progress bar.
"""
from .engine import Engine, RequestOutput

__all__ = ["Engine", "RequestOutput"]
