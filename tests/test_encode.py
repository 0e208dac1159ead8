"""`flowar encode` on real files through a real Ray runtime: bad images become rejects, Fashion-MNIST,
a run killed half-way resumes with no duplicates and no gaps, and mismatches are refused."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    import torch
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "tiny"
    AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                  block_out_channels=[32, 32, 32], layers_per_block=1, latent_channels=4,
                  scaling_factor=0.7, shift_factor=0.05).save_pretrained(path)
    return str(path)


def _config(vae, output, *overrides):
    from pipelines.core.config import load_config
    from pipelines.encode import EncodeConfig
    return load_config(EncodeConfig, None, [f"vae.spec={vae}", f"output={output}", *overrides])


def _image_folder(root):
    """Two classes of real JPEG/PNG files plus a truncated JPEG, a text file and a grey PNG."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            arr = rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.jpg" if i % 2 else root / cls / f"{i}.png")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "cat" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "dog" / "notes.txt").write_text("not an image")
    Image.fromarray(rng.integers(0, 255, (36, 36), dtype=np.uint8), mode="L").save(root / "dog" / "grey.png")


def test_image_folder_with_bad_files(tmp_path, ray_local, tiny_vae):
    import torch

    from flowar.vae import encode_moments, load_vae
    from pipelines.encode import run_encode
    from pipelines.data.latents import LatentDataset, TorchLatentDataset, sample_latents
    from pipelines.data.sources import preprocess
    _image_folder(tmp_path / "images")
    out = tmp_path / "latents"
    summary = run_encode(_config(tiny_vae, out, "source.kind=folder", f"source.path={tmp_path / 'images'}",
                                 "encode.shard_size=4", "encode.pyramid=[1,2]",
                                 "encode.image_pyramid=[2,4]"))
    assert (summary["images"], summary["rejects"], summary["dataset_count"]) == (7, 2, 7)
    assert summary["bytes"] > 0 and summary["images_per_s"] > 0

    rejects = {r["key"]: r["reason"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == {"cat/truncated.jpg", "dog/notes.txt"}
    assert "truncated" in rejects["cat/truncated.jpg"].lower()
    assert "UnidentifiedImageError" in rejects["dog/notes.txt"]

    meta = LatentDataset(str(out)).meta
    assert meta.class_names == ["cat", "dog"] and meta.num_classes == 2 and meta.flip
    assert (meta.latent_size, meta.latent_channels, meta.scales) == (8, 4, [1, 2, 8])
    assert meta.image_scales == [2, 4]
    assert meta.vae["sha256"] == load_vae(tiny_vae)[1].sha256 and meta.count == 7 and meta.rejects == 2
    import pyarrow.parquet as pq
    assert json.loads(pq.read_schema(out / "_common_metadata").metadata[b"flowar.latents"])["count"] == 7

    data = TorchLatentDataset(str(out), random_flip=False)
    assert len(data) == 7 and len(set(data.keys)) == 7
    labels = dict(zip(data.keys, data.labels.tolist()))
    assert labels["dog/grey.png"] == 1 and labels["cat/0.png"] == 0
    # The stored moments are the VAE's moments of the ADM-cropped image (grey -> RGB).
    vae, info = load_vae(tiny_vae)
    i = data.keys.index("dog/grey.png")
    image = preprocess((tmp_path / "images" / "dog" / "grey.png").read_bytes(), 32)
    assert image.shape == (32, 32, 3) and (image[..., 0] == image[..., 2]).all()
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    mean, std = encode_moments(vae, x)
    torch.testing.assert_close(data[i]["mean"], mean[0], rtol=1e-4, atol=1e-4)
    mean_f, _ = encode_moments(vae, x.flip(3))
    torch.testing.assert_close(data.columns["mean_flip"][i], mean_f[0], rtol=1e-4, atol=1e-4)
    # Table 3's image scale construction: scale k is the VAE latent of the image area-downsampled
    # to k * 4 pixels (this VAE downsamples by 4), for the image and its flip.
    for k in (2, 4):
        small = torch.nn.functional.interpolate(x, size=(4 * k, 4 * k), mode="area")
        mean_k, std_k = encode_moments(vae, small)
        assert mean_k.shape == (1, 4, k, k)
        torch.testing.assert_close(data[i]["mean_img%d" % k], mean_k[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(data[i]["std_img%d" % k], std_k[0], rtol=1e-4, atol=1e-4)
        mean_kf, _ = encode_moments(vae, small.flip(3))
        torch.testing.assert_close(data.columns[f"mean_flip_img{k}"][i], mean_kf[0], rtol=1e-4, atol=1e-4)
    pooled = torch.nn.functional.interpolate(mean, size=(2, 2), mode="area")[0]
    assert not torch.allclose(data[i]["mean_img2"], pooled, atol=1e-3)  # not the pooled latent
    # Training's sample: normalised, fresh noise each draw.
    a = sample_latents(data[i]["mean"], data[i]["std"], meta, torch.Generator().manual_seed(1))
    b = sample_latents(data[i]["mean"], data[i]["std"], meta, torch.Generator().manual_seed(2))
    assert not torch.equal(a, b)
    torch.testing.assert_close(sample_latents(mean[0], torch.zeros_like(mean[0]), meta),
                               (mean[0] - 0.05) * 0.7)

    rows = LatentDataset(str(out)).ray_dataset().take_all()
    assert len(rows) == 7 and rows[0]["mean"].shape == (4, 8, 8) and rows[0]["mean_s2"].shape == (4, 2, 2)
    assert rows[0]["mean_img4"].shape == (4, 4, 4) and rows[0]["std_flip_img2"].shape == (4, 2, 2)


def test_fashion_mnist_resume_after_kill(tmp_path, ray_local, tiny_vae):
    """A real kill: the job runs in another process (a Ray driver on the same cluster) and gets
    SIGKILL after some parts are written; the re-run keeps them and does the rest."""
    from pipelines.data.bundled import fashion_mnist_file
    from pipelines.encode import run_encode
    from pipelines.encode_writer import HOLD_ENV
    from pipelines.data.latents import LatentDataset, TorchLatentDataset
    from pipelines.data.sources import read_idx
    out = tmp_path / "fm"
    overrides = ["source.kind=fashion-mnist", "source.limit=960", "encode.shard_size=40",
                 "encode.batch_size=20", "encode.flip=false"]
    # The encoder actor holds after its 2nd part (pipelines.encode_writer.HOLD_ENV), so exactly 2
    # parts are on disk when the kill lands, on an idle machine as on a loaded one.
    hold = {"env_vars": {HOLD_ENV: "2"}}
    script = (f"import ray, sys; sys.path.insert(0, {str(ROOT)!r}); "
              f"ray.init(address={ray_local.get_runtime_context().gcs_address!r}, log_to_driver=False, "
              f"runtime_env={hold!r}); "
              "from test_encode import _config; from pipelines.encode import run_encode; "
              f"run_encode(_config({tiny_vae!r}, {str(out)!r}, *{overrides!r}))")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "RAY_AUTH_MODE": "token"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None and sum(len(v) for v in LatentDataset(str(out)).parts().values()) < 2:
        time.sleep(0.1)  # waits on the parts the job writes; the hold keeps it from finishing
    assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p: os.stat(p).st_mtime_ns for ranges in LatentDataset(str(out)).parts().values() for _, _, p in ranges}
    assert len(before) == 2, "killed while held after 2 parts"
    assert not (out / "metadata.json").exists()

    summary = run_encode(_config(tiny_vae, out, *overrides))
    assert summary["shards_skipped"] == 2 and summary["shards_done"] == 22
    for path, mtime in before.items():  # the killed run's parts are kept, not redone
        assert os.stat(path).st_mtime_ns == mtime
    data = TorchLatentDataset(str(out))
    assert sorted(data.keys) == [f"fashion-mnist/train/{i:05d}" for i in range(960)]  # no dups, no gaps
    labels = read_idx(fashion_mnist_file("train", "labels"))[:960]
    assert [int(labels[int(k[-5:])]) for k in data.keys] == data.labels.tolist()
    meta = LatentDataset(str(out)).meta
    assert meta.count == 960 and meta.class_names[9] == "Ankle boot" and meta.source["kind"] == "fashion-mnist"
    assert not [p for p in out.rglob(".tmp-*")]


def test_mismatches_and_unknown_keys_refused(tmp_path, tiny_vae):
    from flowar.config import ConfigError, FlowARConfig
    from pipelines.cli import main
    from pipelines.encode import _job_record, _prepare_output
    from pipelines.data.latents import LatentDatasetMeta, check_compatible
    meta = LatentDatasetMeta(latent_size=8, latent_channels=4, num_classes=10, vae={"id": "v", "sha256": "a"})
    ok = FlowARConfig(latent_channels=4, scales=(1, 2, 4, 8), num_classes=10)
    check_compatible(meta, ok)
    cases = [(FlowARConfig(latent_channels=16, scales=(1, 2, 4, 8), num_classes=10), "latent_channels"),
             (FlowARConfig(latent_channels=4, scales=(1, 2, 4), num_classes=10), "latent_size"),
             (FlowARConfig(latent_channels=4, scales=(1, 2, 4, 8), num_classes=5), "num_classes")]
    for model, field in cases:
        with pytest.raises(ConfigError, match=field):
            check_compatible(meta, model)
    with pytest.raises(ConfigError, match="vae.sha256"):
        check_compatible(meta, ok, vae={"sha256": "b"})
    # Image scale construction needs every coarser scale encoded from the downsampled image.
    image = FlowARConfig(latent_channels=4, scales=(1, 2, 4, 8), num_classes=10, scale_construction="image")
    meta.image_scales = [1, 2]
    with pytest.raises(ConfigError, match=r"scales \[4\].*encode.image_pyramid=\[1, 2, 4\]"):
        check_compatible(meta, image)
    meta.image_scales = [1, 2, 4]
    check_compatible(meta, image)
    _image_folder(tmp_path / "images")
    from pipelines.encode import run_encode
    with pytest.raises(ConfigError, match=r"encode.image_pyramid=\[2, 8\]: sides \[8\]"):
        run_encode(_config(tiny_vae, tmp_path / "never", "source.kind=folder",
                           f"source.path={tmp_path / 'images'}", "encode.image_pyramid=[2,8]"))
    # This VAE's GroupNorm has one channel per group: a 1x1 latent has one value to normalise.
    with pytest.raises(ConfigError, match=r"cannot encode the 4x4 image of scale 1"):
        run_encode(_config(tiny_vae, tmp_path / "never", "source.kind=folder",
                           f"source.path={tmp_path / 'images'}", "encode.image_pyramid=[1,2]"))
    assert not (tmp_path / "never").exists()

    # An output made with other settings is refused before any work, naming what differs.
    cfg = _config(tiny_vae, tmp_path / "out")
    items = [("a", 0, "r")]
    _prepare_output(cfg, _job_record(meta, cfg, items))
    meta.resolution = 64
    with pytest.raises(ConfigError, match="resolution"):
        _prepare_output(cfg, _job_record(meta, cfg, items))

    (tmp_path / "c.yaml").write_text("source:\n  kind: fashion-mnist\n")
    with pytest.raises(ConfigError, match="encode.bogus"):
        _config(tiny_vae, tmp_path / "o", "encode.bogus=1")
    assert main(["encode", str(tmp_path / "c.yaml"), "source.colour=red"]) == 2
    assert main(["vae", "train", str(ROOT / "configs" / "vae-fashion-mnist.yaml"), "train.stepz=3"]) == 2


def test_flowar_encode_webdataset_with_corrupt_members(tmp_path, ray_local, tiny_vae):
    """`flowar encode` on WebDataset shards (tests/test_sources.py's: a truncated PNG, an image
    without a label, one with an unreadable label, a tar cut inside a member): the good images
    are encoded with their labels, each bad one is a line of rejects.jsonl with its reason."""
    import numpy as np

    from pipelines.cli import main
    from pipelines.data.latents import LatentDataset, TorchLatentDataset
    from test_sources import _webdataset
    _webdataset(tmp_path / "wds", np.random.default_rng(0))
    (tmp_path / "encode.yaml").write_text(f"source:\n  kind: webdataset\n  path: {tmp_path / 'wds'}\n")
    out = tmp_path / "latents"
    assert main(["encode", str(tmp_path / "encode.yaml"), f"vae.spec={tiny_vae}", f"output={out}",
                 "encode.shard_size=3", "encode.flip=false"]) == 0
    rejects = {r["key"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert set(rejects) == {"a/truncated", "a/nolabel", "a/badlabel", "b/cut"}
    assert "truncated" in rejects["a/truncated"]["reason"].lower()
    assert rejects["a/nolabel"]["reason"].startswith("LookupError: no label")
    assert rejects["a/badlabel"]["reason"].startswith("LookupError: unreadable label")
    assert re.search(r"/b\.tar#b/cut\.png@\d+\+\d+$", rejects["b/cut"]["source"])  # where its bytes are
    data = TorchLatentDataset(str(out), random_flip=False)
    assert dict(zip(data.keys, data.labels.tolist())) == {"a/0": 0, "a/1": 2, "a/jpg": 1, "b/0": 3, "b/1": 0}
    meta = LatentDataset(str(out)).meta
    assert (meta.count, meta.rejects, meta.num_classes, meta.source["kind"]) == (5, 4, 4, "webdataset")
