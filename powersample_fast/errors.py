"""User-facing exceptions. Every error names the problem and the fix."""


class PowerSampleError(Exception):
    """Base class for all errors raised by powersample_fast."""


class ModelLoadError(PowerSampleError, ValueError):
    """A model directory, config or checkpoint cannot be loaded."""


class ConfigError(PowerSampleError, ValueError):
    """A sampling argument or model input is invalid."""


class NonFiniteLogitsError(PowerSampleError, FloatingPointError):
    """The model produced NaN/Inf logits while sampling a chain."""
