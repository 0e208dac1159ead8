"""Tokenizers: the LDM KL-16 conversion against the published golden vectors, load_vae, and a
real `flowar vae train` run (Ray Train + MLflow)."""

from __future__ import annotations

import json

import pytest

from conftest import GOLDEN


@pytest.fixture(scope="module")
def golden():
    import torch
    return torch.load(GOLDEN / "reference_kl16_vae_narrow.pt", weights_only=True)


def test_kl16_golden_match(golden):
    import torch

    from flowar.vae import from_ldm_state_dict
    vae = from_ldm_state_dict(golden["state_dict"], golden["config"])
    with torch.no_grad():
        dist = vae.encode(golden["images"]).latent_dist
        decoded = vae.decode(golden["posterior_mean"]).sample
    torch.testing.assert_close(dist.mean, golden["posterior_mean"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dist.logvar, golden["posterior_logvar"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decoded, golden["decoded_from_mean"], rtol=1e-4, atol=5e-4)
    assert vae.config.scaling_factor == pytest.approx(0.2325)


def test_ldm_key_accounting_names_missing_and_unexpected(golden):
    from flowar.vae import from_ldm_state_dict
    sd = dict(golden["state_dict"])
    sd.pop("encoder.mid.attn_1.q.weight")
    sd["decoder.extra.weight"] = sd["quant_conv.bias"]
    sd["loss.discriminator.main.0.weight"] = sd["quant_conv.bias"]  # training-only: ignored by design
    with pytest.raises(ValueError) as e:
        from_ldm_state_dict(sd, golden["config"])
    text = str(e.value)
    assert "encoder.mid_block.attentions.0.to_q.weight" in text and "missing 1" in text
    assert "decoder.extra.weight" in text and "unexpected 1" in text and "loss." not in text
    bad = json.loads(golden["config"])
    bad["z_channels"] = 8
    with pytest.raises(ValueError, match="shape"):
        from_ldm_state_dict(golden["state_dict"], bad)


def test_load_vae_folder_and_ldm_checkpoint(tmp_path, golden):
    import torch
    from diffusers import AutoencoderKL

    from flowar.vae import decode, encode_moments, load_vae, normalise
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        block_out_channels=[32, 32], layers_per_block=1, latent_channels=4,
                        scaling_factor=0.5, shift_factor=0.1)
    vae.save_pretrained(tmp_path / "vae")
    loaded, info = load_vae(str(tmp_path / "vae"))
    assert (info.kind, info.latent_channels, info.downsample) == ("AutoencoderKL", 4, 2)
    assert (info.scaling_factor, info.shift_factor) == (0.5, 0.1)
    assert info.sha256 == load_vae(str(tmp_path / "vae"))[1].sha256 and len(info.sha256) == 64
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = encode_moments(loaded, x)
    assert mean.shape == std.shape == (2, 4, 8, 8) and bool((std > 0).all())
    z = normalise(mean, info)
    torch.testing.assert_close(z, (mean - 0.1) * 0.5)
    images = decode(loaded, z, info)
    assert images.shape == (2, 3, 16, 16) and float(images.abs().max()) <= 1.0
    torch.testing.assert_close(images, loaded.decode(mean).sample.clamp(-1, 1))

    # An LDM checkpoint, weights under "model" as in MAR's kl16.ckpt, config in a sidecar JSON.
    ckpt = tmp_path / "kl16.ckpt"
    torch.save({"model": golden["state_dict"]}, ckpt)
    (tmp_path / "kl16.ckpt.json").write_text(golden["config"])
    kl, kl_info = load_vae(str(ckpt))
    assert (kl_info.kind, kl_info.latent_channels, kl_info.downsample) == ("AutoencoderKL", 16, 16)
    assert kl_info.scaling_factor == pytest.approx(0.2325)
    mean, _ = encode_moments(kl, golden["images"])
    torch.testing.assert_close(mean, golden["posterior_mean"], rtol=1e-4, atol=1e-4)

    with pytest.raises(ValueError, match="no such file or folder"):
        load_vae(str(tmp_path / "missing"))


def _image_folder(root, n: int, bad_every: int):
    """n 32x32 PNGs (16 random ones, repeated) in two class folders, sorted by name as the source
    lists them; item i is not an image (garbage bytes) when i % bad_every == 7."""
    import io

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(16):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf := io.BytesIO(), "PNG")
        pngs.append(buf.getvalue())
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
    for i in range(n):
        data = b"not a png" if i % bad_every == 7 else pngs[i % len(pngs)]
        (root / f"c{2 * i // n}" / f"{i:05d}.png").write_bytes(data)


@pytest.mark.ray
def test_vae_train_streams_its_images_and_writes_loadable_vae(tmp_path, ray_local, mlflow_uri, monkeypatch):
    """`flowar vae train` on a folder of 3072 images, one in every unit of the stream broken: the
    worker reads only the units its steps, windows and normalisation sample need (not the
    source), counts the rejects and trains on; the VAE loads, MLflow holds the run."""
    import math

    import mlflow
    import torch

    from flowar.vae import encode_moments, load_vae, normalise
    from pipelines.core import tracking
    from pipelines.core.config import load_config
    from pipelines.vae_train import UNIT_IMAGES, VAETrainConfig, run_vae_train
    from pipelines.vae_train_loop import STATS_IMAGES
    from conftest import ROOT
    monkeypatch.setenv("FLOWAR_HOME", str(tmp_path))
    n, steps, batch, window = 12 * UNIT_IMAGES, 3, 16, 32
    _image_folder(tmp_path / "images", n, bad_every=UNIT_IMAGES)
    out = tmp_path / "vae"
    cfg = load_config(VAETrainConfig, ROOT / "configs" / "vae-fashion-mnist.yaml", [
        "source.kind=folder", f"source.path={tmp_path / 'images'}", "source.limit=0",
        f"train.steps={steps}", f"train.batch_size={batch}", f"train.shuffle_buffer={window}",
        "train.num_workers=1", "train.log_every=1", "train.image_every=2", f"output={out}",
        f"mlflow.tracking_uri={mlflow_uri}", "mlflow.run_name=vae-test",
        f"ray.storage_path={tmp_path / 'ray'}"])
    run_vae_train(cfg)

    vae, info = load_vae(str(out))
    assert (info.latent_channels, info.downsample) == (4, 4)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    mean, std = encode_moments(vae, images)
    assert mean.shape == (4, 4, 8, 8)
    assert abs(float(normalise(mean, info).std()) - 1.0) < 1.0  # normalisation from the latent stats

    client = mlflow.MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("flowar-vae")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3] and all(math.isfinite(m.value) for m in losses)
    assert tracking.image_steps(client, run.info.run_id, "reconstructions") == [2, 3]

    # Whole units are read: the positions a worker asked for, rounded out to units (+1 for a
    # unit cut by the edge). Training: its steps' positions plus the held images' window and
    # the window read ahead; at the end also the normalisation's sample. Not the source's n.
    def bound(positions):
        return (math.ceil(positions / UNIT_IMAGES) + 1) * UNIT_IMAGES
    metrics = run.data.metrics
    read = client.get_metric_history(run.info.run_id, "data_rows_read")[-1].value
    assert UNIT_IMAGES <= read <= bound(steps * batch + 2 * window) < n
    final_read = metrics["final_data_rows_read"]
    assert read <= final_read <= bound(steps * batch + STATS_IMAGES + 2 * window) < n
    # one reject in every unit read (counted as a unit is decoded, just before it counts as read)
    assert final_read / UNIT_IMAGES <= metrics["final_data_rejects"] <= final_read / UNIT_IMAGES + 1
    assert 0 <= metrics["data_wait_fraction"] <= 1 and metrics["worker_peak_rss_mb"] > 0

    # A second call reuses the saved VAE: no training, no new run.
    before = (out / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    run_vae_train(cfg)
    assert (out / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == before
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_vae_train_refuses_a_bad_window_and_too_few_images(tmp_path):
    from flowar.config import ConfigError
    from pipelines.core.config import load_config
    from pipelines.vae_train import VAETrainConfig, run_vae_train
    from conftest import ROOT
    config = ROOT / "configs" / "vae-fashion-mnist.yaml"
    with pytest.raises(ConfigError, match=r"train\.shuffle_buffer=0 must be at least 1"):
        load_config(VAETrainConfig, config, ["train.shuffle_buffer=0", f"output={tmp_path / 'vae'}"])
    cfg = load_config(VAETrainConfig, config, [
        "source.limit=1", "train.num_workers=2", f"output={tmp_path / 'vae'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    with pytest.raises(ConfigError, match=r"has 1 images, fewer than train\.num_workers=2"):
        run_vae_train(cfg)  # refused before any MLflow run or Ray start
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("kind", ["AutoencoderTiny", "AutoencoderDC"])
def test_load_vae_deterministic_autoencoders(tmp_path, kind):
    import diffusers
    import torch

    from flowar.vae import decode, encode_moments, load_vae, normalise
    small = {"AutoencoderTiny": dict(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                                     num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4),
             "AutoencoderDC": dict(latent_channels=4, encoder_block_types=("ResBlock",) * 2,
                                   decoder_block_types=("ResBlock",) * 2, encoder_block_out_channels=(16, 32),
                                   decoder_block_out_channels=(16, 32), encoder_layers_per_block=(1, 1),
                                   decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()),
                                   decoder_qkv_multiscales=((), ()), decoder_norm_types="rms_norm",
                                   decoder_act_fns="silu", upsample_block_type="interpolate",
                                   downsample_block_type="Conv", scaling_factor=0.4)}[kind]
    getattr(diffusers, kind)(**small).save_pretrained(tmp_path / "vae")
    vae, info = load_vae(str(tmp_path / "vae"))
    assert (info.kind, info.latent_channels, info.downsample) == (kind, 4, 2)
    mean, std = encode_moments(vae, torch.rand(2, 3, 16, 16) * 2 - 1)
    assert mean.shape == (2, 4, 8, 8) and float(std.abs().max()) == 0.0  # no posterior: std 0
    assert decode(vae, normalise(mean, info), info).shape == (2, 3, 16, 16)
