"""`flowar import`: published checkpoints (raw state dicts and training checkpoints) become model
folders that reproduce the published outputs and that `flowar sample` decodes with the named VAE.

The published weights are the golden files' (the real FlowAR-S/L/H files are not offline); the VAE
is the golden narrow KL-16 checkpoint, loaded through the same LDM path as MAR's kl16.ckpt."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import GOLDEN
from flowar.config import ConfigError, preset_config, to_dict

V1 = GOLDEN / "reference_v1_spatial_adaln.pt"
VAE = GOLDEN / "reference_kl16_vae_narrow.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(V1, weights_only=True)


def test_released_configs_are_our_presets():
    from flowar.published import PUBLISHED_CONFIGS, published_config

    for name, args in PUBLISHED_CONFIGS.items():
        assert to_dict(published_config(args)) == to_dict(preset_config(name)), name


def test_raw_state_dict_imports_and_samples_through_the_named_vae(golden, tmp_path, capsys):
    from flowar import FlowAR
    from pipelines.cli import main

    raw = tmp_path / "FlowAR-tiny.pth"
    torch.save(golden["state_dict"], raw)
    out = tmp_path / "imported"
    assert main(["import", str(raw), "--published-config", golden["config"], "--vae", str(VAE),
                 "--out", str(out)]) == 0
    assert "flowar sample" in capsys.readouterr().err
    model = FlowAR.from_pretrained(out).eval()
    sem = model.semantics(golden["latents"], golden["labels"])
    torch.testing.assert_close(sem, golden["train"]["semantics"], rtol=1e-5, atol=1e-5)
    meta = json.loads((out / "latents.json").read_text())
    assert (meta["resolution"], meta["latent_size"], meta["vae"]["scaling_factor"]) == (256, 16, 0.2325)
    imported = json.loads((out / "config.json").read_text())["imported"]
    assert imported["kind"] == "published" and len(imported["sha256"]) == 64

    # The folder is a model like any training export: flowar sample decodes it with that VAE.
    grid = tmp_path / "grid.png"
    assert main(["sample", str(out), "--classes", "1,2", "--per-class", "1", "--out", str(grid),
                 "sampler.num_steps=4", "sampler.cfg=2.0"]) == 0
    from PIL import Image
    width, height = Image.open(grid).size  # one row per class, 256 px images
    assert width >= 256 and height >= 2 * 256

    # A second import into the same folder is refused unless asked for.
    assert main(["import", str(raw), "--published-config", golden["config"], "--vae", str(VAE),
                 "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_training_checkpoint_uses_the_ema_entry(golden, tmp_path):
    from flowar import FlowAR
    from pipelines.import_published import run_import

    noisy = {k: v if k == "mask" or k.endswith("rope.freqs") else v + 1.0  # weights, not buffers
             for k, v in golden["state_dict"].items()}
    ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": noisy, "model_ema": golden["state_dict"], "epoch": 399,
                "args": argparse.Namespace(lr=1e-4, model="flowar_small")}, ckpt)
    for entry, close in (("auto", True), ("model", False)):
        out = tmp_path / entry
        run_import(str(ckpt), str(out), str(VAE), published_config=golden["config"], entry=entry)
        sem = FlowAR.from_pretrained(out).eval().semantics(golden["latents"], golden["labels"])
        assert torch.allclose(sem, golden["train"]["semantics"], atol=1e-5) == close, entry
    with pytest.raises(ConfigError, match="no state dict under 'optimizer'"):
        run_import(str(ckpt), str(tmp_path / "x"), str(VAE), published_config=golden["config"],
                   entry="optimizer")


def test_bad_inputs_are_refused_before_anything_is_written(golden, tmp_path):
    from diffusers import AutoencoderKL

    from pipelines.import_published import run_import

    raw = tmp_path / "raw.pth"
    torch.save(golden["state_dict"], raw)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(raw.read_bytes()[: raw.stat().st_size // 2])
    eight = tmp_path / "vae8"  # 4-channel latents, downsampling by 4
    AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                  block_out_channels=[32] * 3, latent_channels=4).save_pretrained(eight)
    cases = [
        (dict(checkpoint=str(truncated)), "truncated.pth.*cannot be read"),
        (dict(checkpoint=str(tmp_path / "missing.pth")), "does not exist"),
        (dict(vae=str(eight)), "4-channel latents"),
        (dict(model="B"), "released models are S, L, H"),
        (dict(published_config=json.dumps({**json.loads(golden["config"]), "diffloss_w": 256})),
         "shape"),
    ]
    for change, message in cases:
        kwargs = dict(checkpoint=str(raw), out=str(tmp_path / "out"), vae=str(VAE),
                      published_config=golden["config"])
        kwargs.update(change)
        if "model" in change:
            kwargs["published_config"] = ""
        with pytest.raises(ConfigError, match=message):
            run_import(**kwargs)
        assert not (tmp_path / "out").exists(), change
