"""powersample_fast: exact, fast power sampling (Karan & Du, Algorithm 1) for LLMs.

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
    "load": ("loader", "load"),
    "Transformer": ("model", "Transformer"),
    "ModelConfig": ("model", "ModelConfig"),
    "KVCache": ("kv_cache", "KVCache"),
    "SampleResult": ("types", "SampleResult"),
    "PowerSampler": ("sampler", "PowerSampler"),
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
