"""Every path a user gives means the same place on every process (pipelines.core.config path fields).

A job reads its config where the user typed the command; Ray's workers and Tune's trials run in
directories of their own. So `load_config` makes every path absolute and fills the defaults that
depend on the directory ($FLOWAR_HOME, else ./flowar-runs) once, and a second resolution in
another directory (what a worker rebuilding the config would do) changes nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _jobs():
    """(job, config class, overrides giving a relative path to every path field it has)."""
    from pipelines.encode import EncodeConfig
    from pipelines.evaluate.job import EvalConfig
    from pipelines.quickstart import QuickstartConfig
    from pipelines.train.config import TrainJobConfig
    from pipelines.vae_train import VAETrainConfig

    return {
        "train": (TrainJobConfig, ["data.path=./lat", "train.export_dir=out/export",
                                   "ray.storage_path=rr", "mlflow.tracking_uri=sqlite:///m.db"]),
        "encode": (EncodeConfig, ["source.kind=folder", "source.path=imgs", "vae.spec=./vae",
                                  "output=lat"]),
        "vae train": (VAETrainConfig, ["source.path=fm", "output=vae", "ray.storage_path=rr"]),
        "evaluate": (EvalConfig, ["generation.checkpoint=run/export", "generation.vae=./vae",
                                  "reference.source=folder:ref", "inception.weights=w.pth",
                                  "output_dir=ev"]),
        "quickstart": (QuickstartConfig, ["home=qs"]),
    }


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    work = tmp_path / "user"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("FLOWAR_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return work


@pytest.mark.parametrize("job", ["train", "encode", "vae train", "evaluate", "quickstart"])
def test_relative_paths_become_absolute_in_the_users_directory(user_dir, job, monkeypatch):
    from pipelines.core.config import load_config, path_fields, resolve_paths

    cls, overrides = _jobs()[job]
    cfg = load_config(cls, None, overrides)
    given = dict(o.split("=", 1) for o in overrides)
    for key, kind, value, _ in path_fields(cfg):
        if key not in given:
            continue
        raw = given[key]
        if kind == "tracking_uri":
            assert value == f"sqlite:///{user_dir / raw[len('sqlite:///'):]}"
        elif raw.startswith("folder:"):
            assert value == f"folder:{user_dir / raw[len('folder:'):]}"
        else:
            assert value == str((user_dir / raw).resolve()), key
    # A worker or trial that resolved it again elsewhere would get the same config.
    elsewhere = user_dir.parent / "ray-worker-dir"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    import copy

    assert resolve_paths(copy.deepcopy(cfg)) == cfg


@pytest.mark.parametrize("home", ["", "custom-home"])
def test_defaults_land_under_flowar_home(user_dir, monkeypatch, home):
    """No tracking URI, no storage path: ./flowar-runs (or $FLOWAR_HOME) of the user's directory."""
    from pipelines.core.config import load_config
    from pipelines.train.config import TrainJobConfig

    if home:
        monkeypatch.setenv("FLOWAR_HOME", home)  # a relative FLOWAR_HOME is the user's directory's
    cfg = load_config(TrainJobConfig, None, ["data.path=lat"])
    root = user_dir / (home or "flowar-runs")
    assert cfg.mlflow.tracking_uri == f"sqlite:///{root / 'mlflow.db'}"
    assert cfg.ray.storage_path == str(root / "ray_results")


def test_uris_hub_ids_and_named_sources_stay_as_given(user_dir, monkeypatch):
    from pipelines.core.config import load_config
    from pipelines.encode import EncodeConfig
    from pipelines.evaluate.job import EvalConfig

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    enc = load_config(EncodeConfig, None, ["vae.spec=stabilityai/sd-vae-ft-ema",
                                           "output=s3://bucket/latents"])
    assert enc.vae.spec == "stabilityai/sd-vae-ft-ema" and enc.output == "s3://bucket/latents"
    ev = load_config(EvalConfig, None, ["generation.checkpoint=gs://b/export",
                                        "reference.source=fashion-mnist:test"])
    assert ev.generation.checkpoint == "gs://b/export"
    assert ev.reference.source == "fashion-mnist:test"
    assert ev.mlflow.tracking_uri == "http://127.0.0.1:5000"
    # A hub-id-shaped name that is a local folder here is the folder.
    (user_dir / "org" / "vae").mkdir(parents=True)
    local = load_config(EncodeConfig, None, ["vae.spec=org/vae", "output=o"])
    assert local.vae.spec == str(user_dir / "org" / "vae")


def test_submit_reads_paths_as_given(user_dir):
    """flowar submit: relative paths are the job's business on the cluster (its working dir)."""
    from pipelines.core.config import load_config, paths_as_given
    from pipelines.train.config import TrainJobConfig

    with paths_as_given():
        cfg = load_config(TrainJobConfig, None, ["data.path=./lat"])
    assert cfg.data.path == "./lat" and cfg.mlflow.tracking_uri == "" and cfg.ray.storage_path == ""
    assert load_config(TrainJobConfig, None, ["data.path=./lat"]).data.path == str(user_dir / "lat")


def test_print_config_shows_the_resolved_paths(user_dir, capsys):
    """What --print-config prints is what the run uses: absolute paths and filled defaults."""
    import yaml

    from pipelines.cli import main
    from test_train import make_dataset

    make_dataset(user_dir / "lat", count=8, side=8)  # print-config checks the dataset, as the run does
    assert main(["train", str(ROOT / "configs" / "quickstart.yaml"), "data.path=./lat",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["path"] == str(user_dir / "lat")
    assert printed["mlflow"]["tracking_uri"] == f"sqlite:///{user_dir / 'flowar-runs' / 'mlflow.db'}"
    assert printed["ray"]["storage_path"] == str(user_dir / "flowar-runs" / "ray_results")


def test_storage_reads_and_writes_local_paths_like_uris(user_dir):
    """The byte helpers `flowar sample` and `flowar import` write through: relative paths are the
    user's directory's, a local file's folders are made, file:// is a local path, and a local
    file is read in place (no copy)."""
    from pipelines.core import storage

    assert storage.write_bytes("out/deep/grid.png", b"png") == "out/deep/grid.png"
    assert (user_dir / "out" / "deep" / "grid.png").read_bytes() == b"png"
    assert storage.read_bytes(f"file://{user_dir}/out/deep/grid.png") == b"png"
    assert storage.display("out/deep") == str(user_dir / "out" / "deep")
    assert storage.join("s3://b/run/", "export", "config.json") == "s3://b/run/export/config.json"
    with storage.local_file("out/deep/grid.png") as local:
        assert local == user_dir / "out" / "deep" / "grid.png"
    assert local.is_file()  # a local file is never removed with the block


def test_sample_and_import_refuse_unknown_schemes_before_work(user_dir, capsys):
    """A place no filesystem can open is refused with its flag named, before a model is read."""
    from flowar.config import ConfigError
    from pipelines.cli import main
    from pipelines.import_published import run_import

    assert main(["sample", "nosuch://bucket/export", "--out", "g.png"]) == 2
    assert "checkpoint 'nosuch://bucket/export'" in capsys.readouterr().err
    (user_dir / "export").mkdir()
    (user_dir / "export" / "config.json").write_text("{}")
    assert main(["sample", "export", "--out", "nosuch://bucket/g.png"]) == 2
    assert "--out 'nosuch://bucket/g.png'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--out 'nosuch://b/m': cannot open it"):
        run_import("FlowAR-S.pth", "nosuch://b/m", "unused-vae", model="S")
    with pytest.raises(ConfigError, match="published checkpoint 'nosuch://b/FlowAR-S.pth'"):
        run_import("nosuch://b/FlowAR-S.pth", "m", "unused-vae", model="S")
    assert not (user_dir / "m").exists() and not (user_dir / "g.png").exists()
