"""flowar: the FlowAR model library, plain PyTorch (no Ray, no MLflow).

    from flowar import FlowAR
    model = FlowAR.from_preset("S")
    model = flowar.load_published(state_dict, published_kwargs)   # released FlowAR-S/L/H
"""

from .config import ConfigError, FlowARConfig, SamplerConfig, preset_config
from .model import FlowAR
from .published import load_published

__all__ = ["FlowAR", "FlowARConfig", "SamplerConfig", "ConfigError", "preset_config", "load_published"]
