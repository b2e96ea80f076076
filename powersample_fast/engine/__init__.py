"""The continuous-batching engine. Reading order:

1. `sequence.py`   - Request / Group / Seq state and the Phase enum.
2. `kv_cache.py`   - KVCache: K/V storage, one length per row (`set_lengths` writes them).
3. `kv_manager.py` - KVManager: the one owner of rows: who holds each, lengths, forks, backups, moves,
                     token buffers (tok, lp, lq, h, and the log-prob buffers, `extra`); `fit_rows` sizes
                     the cache to free memory; `kv_copies.py`: the queued K/V copies.
4. `scheduler.py`  - plans each step (`SchedulerOutput`): admission, refill, compaction; checks requests.
5. `runner.py`     - ModelRunner: prefill, decode step (eager, CUDA graphs `cuda_graphs.py`, or on CPU
                     steps replayed from traces, `cpu_step.py`), fused sampling; `logprob_rows.py`: the
                     top-N log-probs requests ask for, and scored prompt prefills.
6. `context.py`    - EngineContext: what a policy may touch; `outputs.py` builds a finished group's result.
7. `engine.py`     - Engine: add_request / step / abort / has_unfinished; step = schedule -> prefill ->
                     start -> decode -> postprocess -> compact; `stop_strings.py`: the stop-string
                     check of each sampled token.
8. `policies/`     - what each method does when a row ends (plain, mh: "where a proposal ends" is
                     `policies/mh.py: MHPolicy.on_ended`, its mixing options in mh_chain.py,
                     mh_mixing.py, mh_tries.py; smc, sps, sps_token).
`../api.py` (PowerSampler.generate) is a thin wrapper with a progress bar.
"""
from ..outputs import RequestOutput
from .engine import Engine

__all__ = ["Engine", "RequestOutput"]
