"""The large-dataset encode config (configs/encode-imagenet256.yaml) runs as its header says, and
what it writes is what training at scale reads: float16 moments of MAR's KL-16 at 256 px, with
flips, in Parquet encoded for read speed (pipelines/data/latents.py, parquet_options).

ImageNet and kl16.ckpt are not on this machine: a folder of six real images in two classes and
the golden narrow KL-16 checkpoint (the LDM layout of kl16.ckpt) stand in for the header's
paths. Run from a fresh directory, so the config's relative output lands there."""

from __future__ import annotations

import shlex

import numpy as np
import pytest

from conftest import GOLDEN, ROOT

pytestmark = pytest.mark.ray
CONFIG = ROOT / "configs" / "encode-imagenet256.yaml"
KL16 = GOLDEN / "reference_kl16_vae_narrow.pt"


def header_command() -> list[str]:
    """The arguments of the `flowar encode ...` line of the config's header, as written."""
    line = next(c.lstrip("#").strip() for c in CONFIG.read_text().splitlines()
                if c.lstrip("#").strip().startswith("flowar encode "))
    argv = shlex.split(line)[1:]
    assert argv[:2] == ["encode", "configs/encode-imagenet256.yaml"], argv
    return argv


def test_imagenet256_encode_header_runs_and_writes_float16(tmp_path, ray_local, monkeypatch):
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from flowar.vae import encode_moments, load_vae
    from pipelines.cli import main
    from pipelines.data.latents import LatentDataset
    from pipelines.data.sources import preprocess

    rng = np.random.default_rng(0)
    for cls in ("n01440764", "n01443537"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (260 + 10 * i, 300, 3), dtype=np.uint8)).save(
                tmp_path / "train" / cls / f"{i}.JPEG")
    stand_in = {"source.path": str(tmp_path / "train"), "vae.spec": str(KL16)}
    argv = [arg if "=" not in arg or arg.split("=")[0] not in stand_in
            else f"{arg.split('=')[0]}={stand_in[arg.split('=')[0]]}" for arg in header_command()]
    assert sorted(a.split("=")[0] for a in argv[2:]) == sorted(stand_in)
    monkeypatch.chdir(tmp_path)
    # one actor without a GPU: this machine's 2 cores, not a GPU cluster's 8 GPUs
    assert main([argv[0], str(ROOT / argv[1]), *argv[2:], "encode.actors=1",
                 "encode.actor_cpus=1", "encode.batch_size=4"]) == 0

    dataset = LatentDataset(str(tmp_path / "flowar-runs" / "latents-imagenet256"))
    meta = dataset.meta
    assert (meta.dtype, meta.resolution, meta.latent_size, meta.latent_channels) == ("float16", 256, 16, 16)
    assert meta.flip and meta.count == 6 and meta.class_names == ["n01440764", "n01443537"]
    part = pq.ParquetFile(dataset.part_files()[0])
    names = part.schema_arrow.names
    for name in ("mean", "std", "mean_flip", "std_flip"):
        assert str(part.schema_arrow.field(name).type.value_type) == "halffloat"
        chunk = part.metadata.row_group(0).column(names.index(name))
        assert "BYTE_STREAM_SPLIT" in chunk.encodings and chunk.compression == "ZSTD", chunk
    rows = dataset.read_rows(dataset.units()[0], ["key", "mean", "std", "mean_flip"])
    assert rows["mean"].dtype == np.float16 and rows["mean"].shape[1:] == (16, 16, 16)

    # The stored moments are KL-16's moments of the ADM-cropped 256 px image, to float16 rounding.
    vae, _ = load_vae(str(KL16))
    i = list(rows["key"]).index("n01443537/2.JPEG")
    image = preprocess((tmp_path / "train" / "n01443537" / "2.JPEG").read_bytes(), 256)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        mean, std = encode_moments(vae, x)
        mean_flip, _ = encode_moments(vae, x.flip(3))
    for stored, exact in ((rows["mean"][i], mean[0]), (rows["std"][i], std[0]),
                          (rows["mean_flip"][i], mean_flip[0])):
        torch.testing.assert_close(torch.from_numpy(stored.astype(np.float32)), exact,
                                   rtol=2e-3, atol=2e-3)
