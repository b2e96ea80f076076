"""powersample_fast: exact, fast power sampling (Karan & Du, Algorithm 1) for LLMs."""
from .errors import ConfigError, ModelLoadError, NonFiniteLogitsError, PowerSampleError
from .loader import load
from .model import KVCache, ModelConfig, Transformer
from .types import SampleResult

__version__ = "0.1.0"

__all__ = [
    "load", "Transformer", "ModelConfig", "KVCache", "SampleResult",
    "PowerSampleError", "ConfigError", "ModelLoadError", "NonFiniteLogitsError",
]


def __getattr__(name):  # lazy: the sampler pulls in more modules
    if name == "PowerSampler":
        from .sampler import PowerSampler

        return PowerSampler
    if name == "naive":
        from . import naive

        return naive
    raise AttributeError(name)
