"""Image tokenizers: any diffusers autoencoder, plus the LDM-layout KL-16 of the published models.

FlowAR works on the continuous latent of a VAE. The published models use MAR's KL-16 (an LDM-layout
checkpoint, `kl16.ckpt`); users may also bring any diffusers autoencoder (AutoencoderKL,
AutoencoderDC, AutoencoderTiny) as a local folder or a hub id. Everything downstream sees one
interface: raw posterior moments from `encode_moments`, the VAE's own normalisation in
`normalise`, and `decode` back to images in [-1, 1]. `VAEInfo` records what a latent dataset was
made with (id, weight hash, normalisation) so training can refuse a mismatched dataset.

Plain torch + diffusers: no Ray, no MLflow here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

# The published FlowAR/MAR KL-16 (models/vae.py: AutoencoderKL(embed_dim=16, ch_mult=(1,1,2,2,4))).
KL16_CONFIG = {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "z_channels": 16, "num_res_blocks": 2,
               "attn_resolutions": [16], "resolution": 256, "scale_factor": 0.2325}
KINDS = ("AutoencoderKL", "AutoencoderDC", "AutoencoderTiny")
# LDM training checkpoints also carry the discriminator/LPIPS of the GAN loss: not part of the VAE.
LDM_TRAINING_ONLY_PREFIXES = ("loss.",)


@dataclass
class VAEInfo:
    id: str  # what the user passed (folder, hub id or checkpoint path)
    sha256: str  # hash of the weights (names, dtypes, shapes and values), independent of file format
    kind: str  # AutoencoderKL | AutoencoderDC | AutoencoderTiny
    latent_channels: int
    downsample: int  # image side / latent side
    scaling_factor: float
    shift_factor: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VAEInfo":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"VAEInfo: unknown field(s) {sorted(unknown)}")
        return cls(**data)


# ------------------------------------------------------------------------------------------------
# LDM layout -> diffusers AutoencoderKL
# ------------------------------------------------------------------------------------------------

def _diffusers_kwargs(config: dict, decoder_up_attention: bool) -> dict:
    """diffusers AutoencoderKL constructor arguments for an LDM `ddconfig`-style dict."""
    required = ("ch", "ch_mult", "z_channels", "num_res_blocks")
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"LDM VAE config is missing {missing}; got keys {sorted(config)}")
    ch_mult = list(config["ch_mult"])
    resolution = int(config.get("resolution", 256))
    attn_res = set(config.get("attn_resolutions", []))
    # LDM puts attention in an encoder level when that level's feature size is in attn_resolutions.
    down = [("AttnDownEncoderBlock2D" if resolution // 2 ** i in attn_res else "DownEncoderBlock2D")
            for i in range(len(ch_mult))]
    # MAR's KL-16 decoder has no attention in its up levels (FlowAR issue #3); a standard LDM
    # decoder does, at the mirrored levels. Which one the checkpoint is, its keys say.
    up = [("AttnUpDecoderBlock2D" if decoder_up_attention and resolution // 2 ** i in attn_res
           else "UpDecoderBlock2D") for i in reversed(range(len(ch_mult)))]
    return dict(in_channels=int(config.get("in_channels", 3)), out_channels=int(config.get("out_ch", 3)),
                down_block_types=down, up_block_types=up,
                block_out_channels=[int(config["ch"]) * m for m in ch_mult],
                layers_per_block=int(config["num_res_blocks"]), latent_channels=int(config["z_channels"]),
                norm_num_groups=32, sample_size=resolution,
                scaling_factor=float(config.get("scale_factor", 1.0)),
                shift_factor=float(config.get("shift_factor", 0.0)) or None)


_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "nin_shortcut": "conv_shortcut"}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _ldm_to_diffusers_key(key: str, num_levels: int) -> str | None:
    """The diffusers name of one LDM tensor, or None when the name is not part of the layout."""
    m = re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", key)
    if m:
        return key
    m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key)
    if m:
        return f"{m[1]}.conv_norm_out.{m[2]}"
    m = re.fullmatch(r"(quant_conv|post_quant_conv)\.(weight|bias)", key)
    if m:
        return key
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)", key)
    if m and m[3] in _RESNET_PARTS:
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET_PARTS[m[3]]}.{m[4]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key)
    if m and m[2] in _ATTN_PARTS:
        return f"{m[1]}.mid_block.attentions.0.{_ATTN_PARTS[m[2]]}.{m[3]}"
    # Levels: encoder.down.i -> down_blocks.i; decoder.up.i -> up_blocks.(n-1-i) (LDM builds the
    # decoder's list in reverse and runs it backwards; diffusers stores it in execution order).
    m = re.fullmatch(r"(encoder\.down|decoder\.up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        side, blocks = ("encoder", "down_blocks") if m[1] == "encoder.down" else ("decoder", "up_blocks")
        level = int(m[2]) if side == "encoder" else num_levels - 1 - int(m[2])
        table, kind = (_RESNET_PARTS, "resnets") if m[3] == "block" else (_ATTN_PARTS, "attentions")
        if m[5] in table:
            return f"{side}.{blocks}.{level}.{kind}.{m[4]}.{table[m[5]]}.{m[6]}"
        return None
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    return None


def from_ldm_state_dict(state_dict: dict, config: dict | str):
    """An LDM-layout KL autoencoder (MAR's KL-16 and kin) as a diffusers `AutoencoderKL`.

    Strict: every LDM tensor is used exactly once and every diffusers tensor is filled; otherwise a
    ValueError lists the missing and unexpected keys. `config` is the LDM ddconfig dict (or its
    JSON), as stored in ../shared/golden/reference_kl16_vae_narrow.pt.
    """
    from diffusers import AutoencoderKL

    if isinstance(config, str):
        config = json.loads(config)
    ldm = {k: v for k, v in state_dict.items() if not k.startswith(LDM_TRAINING_ONLY_PREFIXES)}
    num_levels = len(config["ch_mult"])
    up_attention = any(re.match(r"decoder\.up\.\d+\.attn\.", k) for k in ldm)
    vae = AutoencoderKL(**_diffusers_kwargs(config, up_attention))
    target = vae.state_dict()

    converted, unexpected, used_twice = {}, [], []
    for key, tensor in ldm.items():
        name = _ldm_to_diffusers_key(key, num_levels)
        if name is None or name not in target:
            unexpected.append(key)
            continue
        if name in converted:
            used_twice.append(key)
            continue
        if tensor.dim() == 4 and target[name].dim() == 2:  # LDM attention uses 1x1 convs, diffusers Linear
            tensor = tensor[:, :, 0, 0]
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise ValueError(f"LDM tensor {key} has shape {tuple(tensor.shape)} but {name} needs "
                             f"{tuple(target[name].shape)}: the config {config} does not fit this checkpoint")
        converted[name] = tensor
    missing = sorted(set(target) - set(converted))
    if missing or unexpected or used_twice:
        raise ValueError(f"LDM VAE checkpoint does not match config {config}: "
                         f"missing {len(missing)} key(s) {missing[:8]}, unexpected {len(unexpected)} "
                         f"key(s) {sorted(unexpected)[:8]}, mapped twice {used_twice[:8]}")
    vae.load_state_dict(converted, strict=True)
    return vae.eval()


# ------------------------------------------------------------------------------------------------
# Loading any supported VAE
# ------------------------------------------------------------------------------------------------

def weights_sha256(module: torch.nn.Module) -> str:
    """A hash of the weights themselves (not of a file), so a folder and a hub copy agree."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _info(vae, spec: str) -> VAEInfo:
    cfg = vae.config
    kind = type(vae).__name__
    if kind == "AutoencoderKL":
        down = 2 ** (len(cfg.block_out_channels) - 1)
    elif kind == "AutoencoderDC":
        down = int(vae.spatial_compression_ratio)
    elif kind == "AutoencoderTiny":
        down = 2 ** (len(cfg.encoder_block_out_channels) - 1)
    else:
        raise ValueError(f"VAE {spec!r} is a {kind}; supported: {', '.join(KINDS)}")
    return VAEInfo(id=spec, sha256=weights_sha256(vae), kind=kind,
                   latent_channels=int(cfg.latent_channels), downsample=down,
                   scaling_factor=float(getattr(cfg, "scaling_factor", None) or 1.0),
                   shift_factor=float(getattr(cfg, "shift_factor", None) or 0.0))


def _load_ldm_checkpoint(path: Path, config: dict | None):
    """`kl16.ckpt`-style files: weights under `model` or `state_dict`, or a bare state dict."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        blob = load_file(str(path))
    else:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    if config is None:
        sidecar = path.with_suffix(path.suffix + ".json")
        if isinstance(blob, dict) and "config" in blob:
            config = blob["config"]
        elif sidecar.is_file():
            config = json.loads(sidecar.read_text())
        else:
            config = KL16_CONFIG  # what the published FlowAR models use
    for wrapper in ("model", "state_dict"):
        if isinstance(blob, dict) and isinstance(blob.get(wrapper), dict):
            blob = blob[wrapper]
            break
    if not isinstance(blob, dict):
        raise ValueError(f"VAE checkpoint {path} holds no state dict")
    return from_ldm_state_dict(blob, config)


def load_vae(spec: str, device="cpu", ldm_config: dict | None = None):
    """(vae module in eval mode on `device`, VAEInfo) for a folder, hub id or LDM checkpoint.

    spec:
      - a local folder in diffusers `save_pretrained` layout (config.json names the class);
      - an LDM checkpoint file (.ckpt/.pt/.pth/.safetensors): KL-16 layout, config from
        `ldm_config`, the file's `config` entry, a `<file>.json` beside it, or MAR's KL-16;
      - a hub id `org/name` or `org/name:subfolder` (downloads; fails fast when HF_HUB_OFFLINE=1).
    """
    import diffusers

    path = Path(spec).expanduser()
    if path.is_file():
        vae = _load_ldm_checkpoint(path, ldm_config)
    else:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ValueError(f"VAE folder {spec!r} has no config.json (expected a diffusers "
                                 "save_pretrained folder)")
            source, kwargs = str(path), {}
            cls_name = json.loads((path / "config.json").read_text()).get("_class_name", "AutoencoderKL")
        else:
            if spec.startswith((".", "/", "~")) or spec.partition(":")[0].count("/") != 1:
                raise ValueError(f"VAE {spec!r}: no such file or folder, and not a hub id (org/name)")
            repo, _, sub = spec.partition(":")
            source, kwargs = repo, ({"subfolder": sub} if sub else {})
            try:
                cls_name = diffusers.AutoencoderKL.load_config(repo, **kwargs).get("_class_name", "AutoencoderKL")
            except Exception as e:  # offline, missing repo, no config: say which spec and why
                raise ValueError(f"VAE {spec!r}: cannot read its config from the hub ({e})") from None
        if cls_name not in KINDS:
            raise ValueError(f"VAE {spec!r} is a {cls_name}; supported: {', '.join(KINDS)}")
        vae = getattr(diffusers, cls_name).from_pretrained(source, **kwargs)
    info = _info(vae, spec)
    return vae.to(device).eval(), info


def load_for_latents(spec: dict, device="cpu"):
    """(vae, info) for the VAE a latent dataset names (its metadata's `vae`: id, sha256 and the
    normalisation): the weights are checked against the recorded hash, and `info` carries the
    dataset's own normalisation, which may differ from the VAE's config (encode can fit it)."""
    if not spec.get("id"):
        raise ValueError(f"VAE spec {spec!r} names no VAE ('id')")
    vae, info = load_vae(spec["id"], device)
    if spec.get("sha256") and spec["sha256"] != info.sha256:
        raise ValueError(f"VAE {spec['id']!r} has weights {info.sha256[:12]}, but the model was trained "
                         f"on latents of {spec['sha256'][:12]}: decoding would give wrong images")
    info = VAEInfo(**{**info.to_dict(),
                      "scaling_factor": float(spec.get("scaling_factor", info.scaling_factor)),
                      "shift_factor": float(spec.get("shift_factor") or 0.0)})
    return vae, info


# ------------------------------------------------------------------------------------------------
# Encoding, normalisation, decoding
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_moments(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unnormalised) posterior mean and std of images in [-1, 1], (B, 3, H, W).

    Deterministic autoencoders (DC-AE, TAESD) have no posterior: std is zero."""
    kind = type(vae).__name__
    param = next(vae.parameters())
    x = images.to(device=param.device, dtype=param.dtype)
    if kind == "AutoencoderKL":
        dist = vae.encode(x).latent_dist
        return dist.mean.float(), dist.std.float()
    out = vae.encode(x)
    z = out.latents if kind == "AutoencoderTiny" else out.latent
    return z.float(), torch.zeros_like(z, dtype=torch.float32)


def normalise(z: torch.Tensor, info: VAEInfo) -> torch.Tensor:
    """VAE latent -> model space: (z - shift) * scale. `info`: a VAEInfo, or any record with its
    shift_factor and scaling_factor (training reads them from the latent dataset's metadata)."""
    return (z - info.shift_factor) * info.scaling_factor


def denormalise(z: torch.Tensor, info: VAEInfo) -> torch.Tensor:
    return z / info.scaling_factor + info.shift_factor


@torch.no_grad()
def decode(vae, z_normalised: torch.Tensor, info: VAEInfo) -> torch.Tensor:
    """Model-space latents -> images in [-1, 1]."""
    param = next(vae.parameters())
    z = denormalise(z_normalised, info).to(device=param.device, dtype=param.dtype)
    return vae.decode(z).sample.float().clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (any shape) -> uint8 in [0, 255], rounded; outside values clamp."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
