"""Loading the published FlowAR checkpoints (raw state dicts of FlowAR-S/L/H) into our model.

The published code names things differently (its AR halves are "encoder"/"decoder", the flow net
"flownet", the class embedding "class_emb", ...). Each published tensor is renamed by the table
below and used exactly once; the block-causal `mask` and the RoPE `freqs` buffers are not weights
of ours (we compute them) but are checked against what we compute, so a checkpoint made for other
scales or head sizes is refused instead of silently mis-loaded.
"""

from __future__ import annotations

import json
import re

import torch

from .config import ConfigError, FlowARConfig, from_dict
from .model import FlowAR, load_exact

# (published pattern, our replacement), applied in order; the first match wins.
RENAMES = [
    (r"^class_emb\.", "ar.class_embed."),
    (r"^z_proj\.", "ar.input_proj."),
    (r"^z_proj_ln\.", "ar.input_norm."),
    (r"^encoder_pos_embed_learned$", "ar.pos_embed"),
    (r"^encoder_blocks\.", "ar.first_half."),
    (r"^encoder_norm\.", "ar.first_norm."),
    (r"^decoder_embed\.", "ar.bridge."),
    (r"^decoder_pos_embed_learned$", "ar.second_pos_embed"),
    (r"^decoder_blocks\.", "ar.second_half."),
    (r"^decoder_norm\.", "ar.second_norm."),
    (r"^diffusion_pos_embed_learned$", "ar.semantics_pos_embed"),
    (r"^flownet\.cond_embed\.", "flow.semantics_proj."),
    (r"^flownet\.res_blocks\.(\d+)\.crossattn\.", r"flow.blocks.\1.cross_attn."),
    (r"^flownet\.res_blocks\.(\d+)\.norm2_1\.", r"flow.blocks.\1.query_norm."),
    (r"^flownet\.res_blocks\.(\d+)\.norm2_2\.", r"flow.blocks.\1.semantics_norm."),
    (r"^flownet\.res_blocks\.", "flow.blocks."),
    (r"^flownet\.final_layer\.adaLN_modulation\.", "flow.final_layer.ada_lin."),
    (r"^flownet\.", "flow."),
]

# The published constructor's keyword arguments that we understand, with the values we support
# for the ones that have no counterpart in our config.
KNOWN_ARGS = {"img_size", "vae_stride", "patch_size", "encoder_embed_dim", "encoder_depth",
              "encoder_num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
              "vae_embed_dim", "label_drop_prob", "class_num", "diffloss_d", "diffloss_w", "scale",
              "cross", "mlp_ratio", "attn_dropout", "proj_dropout", "buffer_size",
              "grad_checkpointing", "use_checkpoint"}


# The released models' constructor arguments (flowar.py's flowar_small/large/huge with the README's
# flow sizes) and their published sampling settings (README / eval.sh).
PUBLISHED_CONFIGS = {
    "S": dict(encoder_embed_dim=768, decoder_embed_dim=768, encoder_depth=6, decoder_depth=6,
              encoder_num_heads=12, decoder_num_heads=12, diffloss_d=2, diffloss_w=1024, cross=False),
    "L": dict(encoder_embed_dim=1024, decoder_embed_dim=1024, encoder_depth=8, decoder_depth=8,
              encoder_num_heads=16, decoder_num_heads=16, diffloss_d=12, diffloss_w=1024, cross=True),
    "H": dict(encoder_embed_dim=1536, decoder_embed_dim=1536, encoder_depth=15, decoder_depth=15,
              encoder_num_heads=16, decoder_num_heads=16, diffloss_d=12, diffloss_w=1536, cross=True,
              use_checkpoint=True),
}
PUBLISHED_SAMPLERS = {
    "S": dict(num_steps=25, cfg=4.3, guidance_high=0.9),
    "L": dict(num_steps=25, cfg=2.4, guidance_high=0.9),
    "H": dict(num_steps=50, cfg=2.4, guidance_high=0.7),
}


def read_published_file(path, entry: str = "auto") -> dict:
    """The state dict in a published file: a released raw state dict (FlowAR-S/L/H.pth), or a
    training checkpoint of the published code, whose `entry` ("auto": model_ema, else model) is
    used. Loaded with weights_only=True; the training checkpoints' pickled argparse `args` is
    the one class allowed besides tensors (it is read, never used)."""
    import argparse
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"published checkpoint {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            blob = load_file(str(path))
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or pickled code: say which file
        raise ConfigError(f"published checkpoint {str(path)!r} cannot be read safely: "
                          f"{type(e).__name__}: {str(e)[:300]}") from None
    if not isinstance(blob, dict):
        raise ConfigError(f"published checkpoint {str(path)!r} holds a {type(blob).__name__}, not a state dict")
    if all(isinstance(v, torch.Tensor) for v in blob.values()):
        if entry not in ("auto", ""):
            raise ConfigError(f"published checkpoint {str(path)!r} is a raw state dict: it has no "
                              f"entry {entry!r}")
        return blob
    choice = entry if entry not in ("auto", "") else next(
        (k for k in ("model_ema", "model") if isinstance(blob.get(k), dict)), None)
    if choice is None or not isinstance(blob.get(choice), dict):
        raise ConfigError(f"published checkpoint {str(path)!r}: no state dict under "
                          f"{choice or 'model_ema or model'!r}; entries: {sorted(blob)}")
    return blob[choice]


def published_config(config: dict | str) -> FlowARConfig:
    """Our FlowARConfig for the published constructor's keyword arguments."""
    args = json.loads(config) if isinstance(config, str) else dict(config)
    unknown = sorted(set(args) - KNOWN_ARGS)
    if unknown:
        raise ConfigError(f"published config has unknown argument(s) {unknown}; "
                          f"known: {sorted(KNOWN_ARGS)}")
    get = args.get
    if get("patch_size", 1) != 1:
        raise ConfigError(f"published config: patch_size={get('patch_size')} (only 1 exists)")
    if get("buffer_size", 0) != 0:
        raise ConfigError(f"published config: buffer_size={get('buffer_size')} (only 0 works there)")
    width = get("encoder_embed_dim", 1024)
    if get("decoder_embed_dim", width) != width or get("decoder_num_heads", get("encoder_num_heads", 16)) != get("encoder_num_heads", 16):
        raise ConfigError("published config: encoder and decoder widths/heads differ "
                          f"({width} vs {get('decoder_embed_dim')}); one AR width is supported")
    enc, dec = get("encoder_depth", 16), get("decoder_depth", 16)
    if enc != dec:
        raise ConfigError(f"published config: encoder_depth={enc} != decoder_depth={dec}")
    scales = tuple(get("scale", (1, 2, 4, 8, 16)))
    latent = get("img_size", 256) // get("vae_stride", 16)
    if scales[-1] != latent:
        raise ConfigError(f"published config: scale {scales} does not end at the latent size "
                          f"{latent} (img_size / vae_stride)")
    data = dict(
        latent_channels=get("vae_embed_dim", 16), scales=scales, num_classes=get("class_num", 1000),
        ar_width=width, ar_depth=enc + dec, ar_heads=get("encoder_num_heads", 16),
        ar_mlp_ratio=get("mlp_ratio", 4.0), flow_width=get("diffloss_w", 1024),
        flow_depth=get("diffloss_d", 3),
        injection="cross_attention_adaln" if get("cross", False) else "spatial_adaln",
        label_drop=get("label_drop_prob", 0.1), attn_dropout=get("attn_dropout", 0.1),
        proj_dropout=get("proj_dropout", 0.1))
    return from_dict(FlowARConfig, data, "published")


def rename(key: str) -> str:
    for pattern, repl in RENAMES:
        if re.search(pattern, key):
            return re.sub(pattern, repl, key)
    return key


def load_published(state_dict: dict, config: dict | str) -> FlowAR:
    """Build our model from a published checkpoint, refusing anything that does not fit exactly."""
    model = FlowAR(published_config(config))
    ours: dict[str, torch.Tensor] = {}
    problems = []
    for key, value in state_dict.items():
        if key == "mask":
            expected = model.ar.attend
            if tuple(value.shape[-2:]) != tuple(expected.shape) or \
                    not torch.equal(value.reshape(expected.shape) == 0, expected):
                problems.append("mask: block-causal mask does not match the configured scales")
            continue
        if key.endswith(".rope.freqs"):
            # one RoPE per attention there, one per transformer here
            module = model.flow.rope if key.startswith("flownet.") else model.ar.rope
            if value.shape != module.freqs.shape or not torch.allclose(value.float(), module.freqs):
                problems.append(f"{key}: RoPE frequencies differ from the configured head size")
            continue
        new = rename(key)
        if new in ours:
            problems.append(f"{key}: maps onto {new}, which another tensor already filled")
        ours[new] = value
    if problems:
        raise ConfigError("published checkpoint does not fit: " + "; ".join(problems))
    load_exact(model, ours, "published checkpoint")
    return model
