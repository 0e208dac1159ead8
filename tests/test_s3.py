"""Every stage on an object store: a real S3-compatible server on loopback, started by the test.

The server is moto's server mode (`moto.server.ThreadedMotoServer`, from `moto[server]` in the
dev extra): the S3 HTTP API on 127.0.0.1 at a free port, in a thread of this process. boto3 makes
the buckets; everything flowar reads and writes goes through pyarrow's own S3 client
(pipelines/core/storage.py) and Ray Train's storage, pointed at the server by the standard
variables AWS_ENDPOINT_URL, AWS_REGION and AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.

The pipeline test runs encode -> train -> evaluate -> sample through the command line, every data
path an s3:// URI (the dataset, Ray's run storage with its checkpoints, the export, the reference
images, the evaluation's output, the samples), in a fresh interpreter whose environment points at
the server: Ray's workers inherit the environment the driver had when it started Ray, and this
session's Ray may have started before the server existed. The MLflow store stays local.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import GOLDEN, ROOT

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "flowar-test", "AWS_SECRET_ACCESS_KEY": "flowar-test",
               "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port; yields the environment that points at it."""
    pytest.importorskip("moto", reason="the dev extra installs moto[server]: pip install -e '.[dev]'")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process pointed at the server (pyarrow reads the variables when a URI is opened)."""
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


def make_bucket(env: dict, name: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)
    return f"s3://{name}"


def bucket_keys(env: dict, name: str) -> set[str]:
    """Every object key in the bucket, asked of the server with boto3 (not flowar's own client)."""
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=name)
    return {o["Key"] for page in pages for o in page.get("Contents", [])}


# ------------------------------------------------------------------------------ storage itself

def test_storage_round_trip_on_the_server(s3_env, tmp_path):
    from pipelines.core import storage

    root = make_bucket(s3_env, "round-trip")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "a.txt").write_text("a")
    (tmp_path / "tree" / "sub" / "b.bin").write_bytes(b"\x00\x01")
    storage.upload_dir(tmp_path / "tree", storage.join(root, "tree"))
    storage.write_bytes(storage.join(root, "deep", "er", "c.json"), b"{}")
    assert bucket_keys(s3_env, "round-trip") >= {"tree/a.txt", "tree/sub/b.bin", "deep/er/c.json"}
    assert storage.read_bytes(f"{root}/tree/sub/b.bin") == b"\x00\x01"
    assert storage.exists(f"{root}/tree/a.txt") and not storage.exists(f"{root}/tree/nope.txt")
    back = storage.download_dir(f"{root}/tree", tmp_path / "back")
    assert (back / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    with storage.local_file(f"{root}/deep/er/c.json") as local:
        assert local.name == "c.json" and local.read_text() == "{}"
    gone = local.parent
    assert not gone.exists()  # the download is removed with the block
    with pytest.raises(FileNotFoundError, match="is not a file"), \
            storage.local_file(f"{root}/deep/missing.pth"):
        pass


# ------------------------------------------------------------------------- flowar import on S3

def test_import_reads_and_writes_the_bucket(s3_env, tmp_path):
    """flowar import takes the released file from the bucket and writes the model folder there;
    a missing file and an occupied folder are refused before anything is written."""
    import torch

    from flowar import FlowAR
    from flowar.config import ConfigError
    from pipelines.cli import main
    from pipelines.core import storage
    from pipelines.import_published import run_import

    golden = torch.load(GOLDEN / "reference_v1_spatial_adaln.pt", weights_only=True)
    vae = str(GOLDEN / "reference_kl16_vae_narrow.pt")
    root = make_bucket(s3_env, "imports")
    (tmp_path / "released").mkdir()
    torch.save(golden["state_dict"], tmp_path / "released" / "FlowAR-tiny.pth")
    storage.upload_dir(tmp_path / "released", f"{root}/released")
    out = f"{root}/models/flowar-tiny"
    assert main(["import", f"{root}/released/FlowAR-tiny.pth", "--published-config", golden["config"],
                 "--vae", vae, "--out", out]) == 0
    keys = bucket_keys(s3_env, "imports")
    assert {f"models/flowar-tiny/{f}" for f in ("config.json", "model.safetensors", "latents.json")} <= keys
    imported = json.loads(storage.read_bytes(f"{out}/config.json"))["imported"]
    assert imported["checkpoint"] == f"{root}/released/FlowAR-tiny.pth"
    with storage.local_dir(out) as local:
        sem = FlowAR.from_pretrained(local).eval().semantics(golden["latents"], golden["labels"])
    torch.testing.assert_close(sem, golden["train"]["semantics"], rtol=1e-5, atol=1e-5)

    kwargs = {"vae": vae, "published_config": golden["config"]}
    with pytest.raises(ConfigError, match="already holds a model"):
        run_import(f"{root}/released/FlowAR-tiny.pth", out, **kwargs)
    with pytest.raises(ConfigError, match=r"s3://imports/released/FlowAR-S\.pth' does not exist"):
        run_import(f"{root}/released/FlowAR-S.pth", f"{root}/models/other", **kwargs)
    torch.save([1, 2], tmp_path / "list.pth")  # readable, but not a state dict
    storage.write_bytes(f"{root}/bad/list.pth", (tmp_path / "list.pth").read_bytes())
    with pytest.raises(ConfigError, match=r"'s3://imports/bad/list\.pth' holds a list"):
        run_import(f"{root}/bad/list.pth", f"{root}/models/other", **kwargs)
    assert not any(k.startswith("models/other") for k in bucket_keys(s3_env, "imports"))


def test_sample_refuses_a_bucket_folder_without_a_model(s3_env):
    from pipelines.cli import main

    root = make_bucket(s3_env, "empty-models")
    assert main(["sample", f"{root}/nothing-here", "--out", f"{root}/grid.png"]) == 2
    assert bucket_keys(s3_env, "empty-models") == set()


# ------------------------------------------------------------------- the pipeline, end to end

def _pipeline(root: str, vae: str, work: str) -> None:
    """encode -> train -> sample -> evaluate through the command line, every data path under
    `root` (an s3:// URI). Runs in the subprocess; writes each stage's exit status to
    <work>/stages.json, with its seconds (a stage whose input failed is not run)."""
    from pipelines.cli import main

    configs, export = ROOT / "configs", f"{root}/ray_results/s3-run/export"
    stages = {
        "encode": ["encode", str(configs / "encode-fashion-mnist.yaml"), f"vae.spec={vae}",
                   f"output={root}/latents", "source.limit=96", "encode.resolution=16",
                   "encode.flip=false", "encode.shard_size=48", "encode.batch_size=48"],
        "train": ["train", str(configs / "train-tiny.yaml"), f"data.path={root}/latents",
                  f"ray.storage_path={root}/ray_results", "train.num_workers=1",
                  "train.max_steps=6", "train.checkpoint_every=3", "train.log_every=3",
                  "train.warmup_steps=1", "mlflow.run_name=s3-run"],
        "sample": ["sample", export, "--classes", "0,1", "--per-class", "2", "sampler.num_steps=4",
                   "--out", f"{root}/samples/grid.png", "--images-dir", f"{root}/samples/files"],
        "evaluate": ["evaluate", str(configs / "eval-fashion-mnist.yaml"),
                     f"generation.checkpoint={export}", f"reference.source=folder:{root}/reference",
                     f"output_dir={root}/eval", "generation.num_samples=8",
                     "generation.samples_per_class=1", "generation.batch_size=4",
                     "generation.shard_size=4", "sampler.num_steps=4", "reference.max_images=8",
                     "reference.batch_size=8", "reference.shard_size=8", "metrics.kid=false",
                     "metrics.prc=false", "metrics.isc=false", "metrics.isc_splits=1",
                     "workers.num_workers=1"],
    }
    needs = {"train": "encode", "sample": "train", "evaluate": "train"}
    status: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for name, argv in stages.items():
        if status.get(needs.get(name, ""), 0) != 0:
            continue
        start = time.monotonic()
        try:
            status[name] = main(argv)
        except Exception:  # noqa: BLE001  (the traceback goes to stderr, which the test shows)
            import traceback

            traceback.print_exc()
            status[name] = 1
        seconds[name] = round(time.monotonic() - start, 1)
        print(f"STAGE {name} exit {status[name]} after {seconds[name]} s", flush=True)
        (Path(work) / "stages.json").write_text(json.dumps({"status": status, "seconds": seconds}))


def _reference_images(root: str, folder) -> None:
    """Eight Fashion-MNIST test images as PNG files in the bucket: the evaluation's reference."""
    from PIL import Image

    from pipelines.core import storage
    from pipelines.data.bundled import fashion_mnist_file
    from pipelines.data.sources import read_idx

    folder.mkdir()
    for i, image in enumerate(read_idx(fashion_mnist_file("test", "images"))[:8]):
        Image.fromarray(image).save(folder / f"{i}.png")
    storage.upload_dir(folder, f"{root}/reference")


def _tiny_vae(path) -> str:
    """A random-weight AutoencoderKL downsampling by 4: 16 px images -> 4x4x4 latents, the
    latents configs/train-tiny.yaml trains on. A model, not data: it stays a local folder
    (flowar.vae.load_vae takes folders, files and hub ids)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                  block_out_channels=[32, 32, 32], layers_per_block=1,
                  latent_channels=4).save_pretrained(path)
    return str(path)


@pytest.mark.ray
@pytest.mark.slow
def test_encode_train_evaluate_sample_with_every_path_in_a_bucket(s3_server, tmp_path):
    root = make_bucket(s3_server, "flowar")
    with pytest.MonkeyPatch.context() as mp:  # this process writes the reference images
        for key, value in s3_server.items():
            mp.setenv(key, value)
        _reference_images(root, tmp_path / "reference")
    vae = _tiny_vae(tmp_path / "vae")
    env = {**os.environ, **s3_server, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "FLOWAR_HOME": str(tmp_path / "home"),  # the MLflow store: local, the default place
           "FLOWAR_CACHE": str(tmp_path / "cache"), "MLFLOW_TRACKING_URI": ""}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, started with this environment
    code = (f"import sys; sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]; "
            f"from test_s3 import _pipeline; _pipeline({root!r}, {vae!r}, {str(tmp_path)!r})")
    done = subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    log = (done.stdout + done.stderr)[-8000:]
    stages = json.loads((tmp_path / "stages.json").read_text())["status"]
    keys = bucket_keys(s3_server, "flowar")
    # encode: the dataset's parts and metadata
    assert stages.get("encode") == 0, log
    assert "latents/metadata.json" in keys
    assert len([k for k in keys if k.startswith("latents/") and k.endswith(".parquet")]) == 2
    # train: Ray's run storage with the step checkpoints, and the EMA export beside them
    assert stages.get("train") == 0, log
    run = "ray_results/s3-run"
    assert {f"{run}/export/{f}" for f in ("config.json", "model.safetensors", "latents.json")} <= keys
    checkpoints = {k.split("/")[2] for k in keys if k.startswith(f"{run}/checkpoint_") and k.count("/") > 2}
    assert len(checkpoints) == 2, checkpoints
    for c in checkpoints:
        assert {f"{run}/{c}/state.json", f"{run}/{c}/model.safetensors"} <= keys
    assert not (tmp_path / "home" / "ray_results").exists()  # nothing went to local storage
    assert f"run dir {root}/{run}\n" in done.stdout  # the scheme kept (Ray's result.path drops it)
    assert (tmp_path / "home" / "mlflow.db").is_file()  # the tracking store stays local
    # sample: the grid and the files
    assert stages.get("sample") == 0, log
    assert {"samples/grid.png"} | {f"samples/files/class{i // 2}_{i:06d}.png" for i in range(4)} <= keys
    # evaluate: the report and the grid
    assert stages.get("evaluate") == 0, log
    assert {"eval/report.json", "eval/samples.png"} <= keys
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.items():
            mp.setenv(key, value)
        from pipelines.core import storage

        report = json.loads(storage.read_bytes(f"{root}/eval/report.json"))
    assert report["num_generated"] == 8 and report["num_reference"] == 8
    assert report["results"]["fid"] > 0
