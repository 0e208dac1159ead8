"""Typed configuration of the FlowAR model and its sampler.

One dataclass per concern. Every ablation of the paper is a field here, with the published design
as the default, so one config file names a whole experiment. `from_dict` is strict: an unknown key
is an error that names the key and the keys that exist. The pipelines build their job configs on
the same helpers.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

INJECTIONS = ("spatial_adaln", "cross_attention_adaln", "adaln", "addition", "cross_attention",
              "sequence_concat", "channel_concat")


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


@dataclass
class FlowARConfig:
    # --- data geometry: the pyramid is made from the VAE latent, nothing assumes 16 ---
    latent_channels: int = 16
    scales: tuple[int, ...] = (1, 2, 4, 8, 16)  # side of each scale's square grid, coarse to fine
    num_classes: int = 1000  # class index num_classes is the null class used for CFG

    # --- scale-wise autoregressive transformer ---
    ar_width: int = 768
    ar_depth: int = 12  # split in two halves, as the published code does (encoder + decoder)
    ar_heads: int = 12
    ar_mlp_ratio: float = 4.0  # the GEGLU hidden size is int(width * ratio * 2/3)

    # --- flow-matching transformer, one network shared by all scales ---
    flow_width: int = 1024
    flow_depth: int = 2
    flow_head_dim: int = 64  # heads = flow_width // flow_head_dim
    flow_mlp_ratio: float = 8 / 3
    time_freq_dim: int = 256

    # --- ablation switches (paper Tables 3-6), published design first ---
    injection: Literal["spatial_adaln", "cross_attention_adaln", "adaln", "addition",
                       "cross_attention", "sequence_concat", "channel_concat"] = "spatial_adaln"
    head: Literal["per_scale", "per_token"] = "per_scale"
    objective: Literal["flow", "diffusion"] = "flow"
    scale_input: Literal["bicubic_area", "upsample2x"] = "bicubic_area"
    # Table 3: "latent" downsamples the finest latent; "image" encodes a downsampled image per
    # scale with the VAE (the training job then passes those maps as `scale_targets`).
    scale_construction: Literal["latent", "image"] = "latent"

    # --- training knobs the published code hides ---
    attn_dropout: float = 0.1  # published training default, inherited from MAR
    proj_dropout: float = 0.1
    label_drop: float = 0.1
    init: Literal["published", "zero"] = "published"  # "zero": adaLN-Zero gates and final layer
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"
    loss_weighting: Literal["token_count", "equal"] = "token_count"
    diffusion_steps: int = 1000  # length of the DDPM schedule when objective == "diffusion"
    # Gradient checkpointing is how a model is trained, not what it is: a training job's
    # model.grad_checkpointing (pipelines/train/config.py), never part of a saved model's config.

    def __post_init__(self):
        """Every value and combination the model cannot be built or trained with, refused when
        the config is read (ConfigError naming the keys), not when a layer or sampler meets it."""
        self.scales = tuple(int(s) for s in self.scales)
        validate_scales(self.scales)
        at_least = {"latent_channels": 1, "num_classes": 1, "ar_width": 1, "ar_heads": 1,
                    "ar_depth": 2,  # split into an encoder half and a decoder half
                    "flow_width": 1, "flow_depth": 1, "flow_head_dim": 1,
                    "time_freq_dim": 2,  # sin and cos of at least one frequency
                    "diffusion_steps": 1}
        for key, low in at_least.items():
            if getattr(self, key) < low:
                raise ConfigError(f"model.{key}={getattr(self, key)!r}: need at least {low}")
        for key in ("label_drop", "attn_dropout", "proj_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}={getattr(self, key)!r}: need a value in [0, 1)")
        if int(self.ar_width * self.ar_mlp_ratio * 2 / 3) < 1:
            raise ConfigError(f"model.ar_mlp_ratio={self.ar_mlp_ratio!r}: the AR MLP of "
                              f"model.ar_width={self.ar_width} would have no hidden units")
        if int(self.flow_width * self.flow_mlp_ratio) < 1:
            raise ConfigError(f"model.flow_mlp_ratio={self.flow_mlp_ratio!r}: the flow MLP of "
                              f"model.flow_width={self.flow_width} would have no hidden units")
        if self.ar_width % self.ar_heads:
            raise ConfigError(f"model.ar_width={self.ar_width} is not divisible by "
                              f"model.ar_heads={self.ar_heads}")
        if self.flow_width % self.flow_head_dim:
            raise ConfigError(f"model.flow_width={self.flow_width} is not divisible by "
                              f"model.flow_head_dim={self.flow_head_dim}")
        if (self.ar_width // self.ar_heads) % 4 or self.flow_head_dim % 4:
            raise ConfigError("2D RoPE needs head dimensions divisible by 4: "
                              f"ar {self.ar_width // self.ar_heads} (model.ar_width / model.ar_heads), "
                              f"flow {self.flow_head_dim} (model.flow_head_dim)")
        if self.head == "per_token" and self.injection not in ("spatial_adaln", "adaln",
                                                               "addition", "channel_concat"):
            raise ConfigError(f"model.head='per_token' cannot be combined with "
                              f"model.injection='{self.injection}': "
                              "a per-token MLP head sees one token, so it has no sequence to attend "
                              "over; use injection 'spatial_adaln', 'adaln', 'addition' or "
                              "'channel_concat'")

    @property
    def latent_size(self) -> int:
        return self.scales[-1]

    @property
    def num_tokens(self) -> int:
        return sum(s * s for s in self.scales)


def validate_scales(scales: tuple[int, ...], latent_size: int | None = None) -> None:
    """Scales must be positive, strictly increasing, start at 1 and end at the latent's side."""
    if len(scales) < 1 or any(s < 1 for s in scales):
        raise ConfigError(f"model.scales={scales}: need at least one positive scale")
    if any(b <= a for a, b in zip(scales, scales[1:])):
        raise ConfigError(f"model.scales={scales}: scales must be strictly increasing, coarse to fine")
    if scales[0] != 1:
        # The AR sequence opens with the class token, which is the whole first scale's input.
        raise ConfigError(f"model.scales={scales}: the first scale must be 1 (the class token "
                          "is the 1x1 scale's input)")
    if latent_size is not None and scales[-1] != latent_size:
        raise ConfigError(f"model.scales={scales} ends at {scales[-1]}, but the latent is "
                          f"{latent_size}x{latent_size}: the last scale must be the latent's size")


@dataclass
class SamplerConfig:
    num_steps: int = 25
    cfg: float = 4.3
    guidance_low: float = 0.0
    guidance_high: float = 0.9  # CFG is applied only while guidance_low <= t <= guidance_high
    cfg_schedule: Literal["linear", "constant"] = "linear"  # linear: cfg ramps over scales, none at 1x1
    time_grid: Literal["published", "uniform"] = "published"
    solver: Literal["euler", "heun", "sde"] = "euler"

    def __post_init__(self):
        """Also the grids flowar.sampling.time_grid cannot build (same messages), so a sampler
        that cannot sample is refused when the config is read, not at the first sample grid.
        Combinations with the model (objective=diffusion needs solver=euler) are checked where
        both meet, by `check_sampler_fits`: the train job's config, evaluate's and sample's
        (against the checkpoint's config.json) and generate()."""
        if self.num_steps < 1:
            raise ConfigError(f"sampler.num_steps={self.num_steps}: need at least one step")
        if self.time_grid == "published" and self.num_steps < 4:
            raise ConfigError(f"sampler.num_steps={self.num_steps}: the published grid needs at least "
                              "4 points; use sampler.time_grid=uniform for fewer steps")
        if self.cfg < 1.0:
            raise ConfigError(f"sampler.cfg={self.cfg}: guidance scales below 1 are not supported")
        if not 0.0 <= self.guidance_low <= self.guidance_high <= 1.0:
            raise ConfigError(f"sampler.guidance_low={self.guidance_low}, sampler.guidance_high="
                              f"{self.guidance_high}: the guidance interval must satisfy "
                              "0 <= low <= high <= 1")


def check_sampler_fits(objective: str, sampler: SamplerConfig) -> None:
    """The one check of a sampler against a model: the diffusion objective samples with DDIM,
    which has no heun or sde variant. Train, evaluate, sample and generate() all call it."""
    if objective == "diffusion" and sampler.solver != "euler":
        raise ConfigError(f"sampler.solver={sampler.solver!r} needs model.objective='flow'; "
                          "model.objective='diffusion' samples with DDIM (leave sampler.solver=euler)")


# ----------------------------------------------------------------------------------------------
# Strict dict <-> dataclass conversion, shared with pipelines/core/config.py.
# ----------------------------------------------------------------------------------------------

def to_dict(obj) -> dict:
    """A dataclass as plain, YAML/JSON-safe data (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(obj)


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from `data`, refusing unknown keys and ill-typed values."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"valid keys{' of ' + where if where else ''}: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            key = f"{where}.{name}" if where else name
            kwargs[name] = _coerce(hints[name], data[name], key)
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, args))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.replace("-", ",").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r}: expected a list")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or
                                           (isinstance(value, float) and value.is_integer())):
            try:
                return int(str(value))
            except ValueError:
                raise ConfigError(f"{key}={value!r}: expected an integer") from None
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected a number") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    return value


# Keys that saved configs of earlier versions hold and that no longer configure the model:
# exports written while gradient checkpointing was a model field say "grad_checkpointing".
RETIRED_KEYS = ("grad_checkpointing",)


def saved_model_config(data: dict | None, where: str = "model") -> FlowARConfig:
    """The model section of a saved model's config.json: as strict as from_dict, except that
    keys of earlier versions that no longer configure the model (RETIRED_KEYS) are ignored."""
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in RETIRED_KEYS}
    return from_dict(FlowARConfig, data, where)


def replace(cfg, **overrides):
    """`dataclasses.replace` that re-validates and reports unknown keys like from_dict."""
    data = to_dict(cfg)
    data.update(overrides)
    return from_dict(type(cfg), data)


# Presets (paper Table 8; S, L, H are the published constructors, exact to the parameter).
# B was never released. Table 8 fixes only its depths and widths; with S's MLP sizes that shape has
# 289.8M parameters, 3.4% short of the 300M the paper reports for it. The one size Table 8 leaves
# open is the MLP, so B's AR blocks use a GEGLU hidden of 3 x 768 = 2304 (ar_mlp_ratio 4.5; S uses
# 2048), which gives 299.2M. `from_preset("B", ar_mlp_ratio=4.0)` is the 289.8M reading.
PRESETS: dict[str, dict] = {
    "S": dict(ar_width=768, ar_depth=12, ar_heads=12, flow_width=1024, flow_depth=2),
    "B": dict(ar_width=768, ar_depth=16, ar_heads=12, ar_mlp_ratio=4.5, flow_width=1024,
              flow_depth=6),
    "L": dict(ar_width=1024, ar_depth=16, ar_heads=16, flow_width=1024, flow_depth=12,
              injection="cross_attention_adaln"),
    "H": dict(ar_width=1536, ar_depth=30, ar_heads=16, flow_width=1536, flow_depth=12,
              injection="cross_attention_adaln"),
    # Debug sizes for CPU tests and the quickstart (torchtitan-style tiny models).
    "tiny": dict(ar_width=64, ar_depth=2, ar_heads=2, flow_width=64, flow_depth=1, flow_head_dim=32,
                 attn_dropout=0.0, proj_dropout=0.0),
    "small-cpu": dict(ar_width=128, ar_depth=4, ar_heads=4, flow_width=128, flow_depth=2,
                      flow_head_dim=32, attn_dropout=0.0, proj_dropout=0.0),
}


def preset_config(name: str, **overrides) -> FlowARConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return from_dict(FlowARConfig, {**PRESETS[name], **overrides}, "model")
