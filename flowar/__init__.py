"""flowar: the FlowAR model library, plain PyTorch (no Ray, no MLflow).

    from flowar import FlowAR
    model = FlowAR.from_preset("S")
    model = flowar.load_published(state_dict, published_kwargs)   # released FlowAR-S/L/H

Attributes are imported lazily, so `flowar.config` (used by every job's argument parsing) does not
pull in torch and timm.
"""

from importlib import import_module

_EXPORTS = {
    "FlowAR": "flowar.model", "load_published": "flowar.published",
    "read_published_file": "flowar.published",
    "FlowARConfig": "flowar.config", "SamplerConfig": "flowar.config",
    "ConfigError": "flowar.config", "preset_config": "flowar.config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flowar' has no attribute {name!r}")
