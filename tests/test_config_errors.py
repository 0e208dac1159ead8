"""Every value or combination a job refuses is refused when its config is read (issue 13, item 4).

For each refused case of `flowar train`, `flowar encode` and `flowar vae train`: the job's load
function raises ConfigError naming the keys; `flowar JOB ... --print-config` exits 2 with that
same message; the run (the same command without --print-config, and the job's run function given
an edited config) refuses with that message too, before any MLflow or Ray work. No Ray here.
"""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from flowar.config import ConfigError

TINY = ROOT / "configs" / "train-tiny.yaml"
ENCODE = ROOT / "configs" / "encode-fashion-mnist.yaml"
VAE = ROOT / "configs" / "vae-fashion-mnist.yaml"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh $FLOWAR_HOME: the default MLflow store and Ray storage would appear in it."""
    monkeypatch.setenv("FLOWAR_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def refused(load, *args) -> str:
    with pytest.raises(ConfigError) as err:
        load(*args)
    return str(err.value)


def cli(capsys, *argv) -> tuple[int, str]:
    from pipelines.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert not out.out  # nothing printed, nothing run
    return rc, out.err


def assert_names(message: str, keys) -> None:
    missing = [k for k in keys if k not in message]
    assert not missing, f"{missing} not named in: {message}"


# ------------------------------------------------------------------------------------ flowar train

TRAIN_CASES = {
    # cross-section combinations (TrainJobConfig: check_job)
    "diffusion+heun": (["model.objective=diffusion", "sampler.solver=heun"],
                       ["sampler.solver='heun'", "model.objective"]),
    "diffusion+sde": (["model.objective=diffusion", "sampler.solver=sde"],
                      ["sampler.solver='sde'", "model.objective"]),
    "sample_classes>=num_classes": (["train.sample_classes=[3,12]"],
                                    ["train.sample_classes [12]", "model.num_classes=10"]),
    "sample_classes<0": (["train.sample_classes=[-1,2]"], ["train.sample_classes [-1]"]),
    # the sampler: time grid impossible for num_steps, guidance
    "published grid, 2 steps": (["sampler.num_steps=2"], ["sampler.num_steps=2", "sampler.time_grid"]),
    "no steps": (["sampler.num_steps=0", "sampler.time_grid=uniform"], ["sampler.num_steps=0"]),
    "cfg<1": (["sampler.cfg=0.5"], ["sampler.cfg=0.5"]),
    "guidance low>high": (["sampler.guidance_low=0.6", "sampler.guidance_high=0.2"],
                          ["sampler.guidance_low=0.6", "sampler.guidance_high=0.2"]),
    # the model (after the tiny preset: ar_width 64, flow_width 64)
    "ar_heads=0": (["model.ar_heads=0"], ["model.ar_heads=0"]),
    "ar_width % ar_heads": (["model.ar_heads=3"], ["model.ar_width=64", "model.ar_heads=3"]),
    "RoPE head dim": (["model.ar_heads=32"], ["RoPE", "model.ar_width / model.ar_heads"]),
    "flow_head_dim=0": (["model.flow_head_dim=0"], ["model.flow_head_dim=0"]),
    "flow_width % head_dim": (["model.flow_head_dim=24"],
                              ["model.flow_width=64", "model.flow_head_dim=24"]),
    "ar_depth=1": (["model.ar_depth=1"], ["model.ar_depth=1"]),
    "time_freq_dim=1": (["model.time_freq_dim=1"], ["model.time_freq_dim=1"]),
    "diffusion_steps=0": (["model.objective=diffusion", "model.diffusion_steps=0"],
                          ["model.diffusion_steps=0"]),
    "ar_mlp_ratio=0": (["model.ar_mlp_ratio=0"], ["model.ar_mlp_ratio=0"]),
    "flow_mlp_ratio=0": (["model.flow_mlp_ratio=0"], ["model.flow_mlp_ratio=0"]),
    "label_drop=1": (["model.label_drop=1.0"], ["model.label_drop=1.0"]),
    "per_token+cross_attention": (["model.head=per_token", "model.injection=cross_attention"],
                                  ["model.head='per_token'", "model.injection='cross_attention'"]),
    "scales not increasing": (["model.scales=[1,4,2]"], ["model.scales"]),
    # the train section and the job
    "batch not divisible": (["train.global_batch_size=15"],
                            ["train.global_batch_size=15", "train.num_workers"]),
    "log_every=0": (["train.log_every=0"], ["train.log_every=0"]),
    "unknown preset": (["preset=nope"], ["preset='nope'"]),
    "empty data.path": (["data.path="], ["data.path"]),
    # how the input streams (issue 15)
    "shuffle_buffer=0": (["data.shuffle_buffer=0"], ["data.shuffle_buffer=0"]),
    "partitions<0": (["data.partitions=-1"], ["data.partitions=-1"]),
    "partitions vs batch": (["data.partitions=3"],
                            ["data.partitions=3", "train.global_batch_size=16"]),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses_at_config_read_print_config_and_run(case, tmp_path, home, capsys):
    from pipelines.train.config import load_train_config

    overrides, keys = TRAIN_CASES[case]
    args = [f"data.path={tmp_path / 'latents'}", *overrides]
    message = refused(load_train_config, TINY, args)
    assert_names(message, keys)
    expected = f"flowar train: configuration error: {message}\n"
    assert cli(capsys, "train", TINY, *args, "--print-config") == (2, expected)
    assert cli(capsys, "train", TINY, *args) == (2, expected)  # the run: the same, at once
    assert not home.exists()  # no MLflow store, no Ray storage


@pytest.mark.parametrize("edit,keys", [
    ({"model.objective": "diffusion", "sampler.solver": "heun"}, ["sampler.solver", "model.objective"]),
    ({"train.sample_classes": (0, 10)}, ["train.sample_classes [10]"]),
    ({"sampler.num_steps": 3}, ["sampler.num_steps=3"]),
    ({"model.ar_heads": 3}, ["model.ar_width", "model.ar_heads"]),
])
def test_run_train_refuses_an_edited_config_before_mlflow_and_ray(edit, keys, tmp_path, home):
    """Callers that build a config and then change it (sweeps, notebooks) meet the same checks."""
    from pipelines.train.config import load_train_config
    from pipelines.train.job import run_train

    args = [f"data.path={tmp_path / 'latents'}"]
    cfg = load_train_config(TINY, args)  # valid
    for key, value in edit.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    message = refused(run_train, cfg)
    assert_names(message, keys)
    assert message == refused(load_train_config, TINY, args + [f"{k}={list(v) if isinstance(v, tuple) else v}"
                                                               for k, v in edit.items()])
    assert not home.exists() and not (tmp_path / "latents").exists()


# ------------------------------------------------------------------------------------ flowar encode

@pytest.fixture
def vae_folder(tmp_path):
    """A diffusers VAE folder as far as the config read looks: config.json alone (3 levels: /4).
    The checks below must refuse from it without loading weights (there are none)."""
    path = tmp_path / "vae"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "block_out_channels": [32, 32, 32], "latent_channels": 4}))
    return path


# (overrides, what the message names, whether the check reads the VAE's config); {no_config},
# {other_kind} and {missing} are VAE paths the test makes (a folder with no config.json, one of
# an unsupported class, nothing).
ENCODE_CASES = {
    # the config alone (EncodeConfig / EncodeSection)
    "empty output": (["output="], ["output is empty"], False),
    "empty vae.spec": (["vae.spec="], ["vae.spec is empty"], False),
    "resolution=0": (["encode.resolution=0"], ["encode.resolution=0"], False),
    "shard_size=0": (["encode.shard_size=0"], ["encode.shard_size=0"], False),
    "batch_size=0": (["encode.batch_size=0"], ["encode.batch_size=0"], False),
    "actors=0": (["encode.actors=0"], ["encode.actors=0"], False),
    "actor_cpus=0": (["encode.actor_cpus=0"], ["encode.actor_cpus=0"], False),
    "actor_gpus<0": (["encode.actor_gpus=-1"], ["encode.actor_gpus=-1"], False),
    "pyramid side 0": (["encode.pyramid=[0,2]"], ["encode.pyramid=[0, 2]"], False),
    "image_pyramid side 0": (["encode.image_pyramid=[0]"], ["encode.image_pyramid=[0]"], False),
    # with the VAE's config.json (downsampling factor 4: 32 px -> an 8x8 latent)
    "resolution vs VAE": (["encode.resolution=30"], ["encode.resolution=30", "factor 4", "vae.spec"],
                          True),
    "pyramid not coarser": (["encode.pyramid=[2,8]"], ["encode.pyramid=[2, 8]", "sides [8]",
                                                        "8x8 latent"], True),
    "image_pyramid not coarser": (["encode.image_pyramid=[4,16]"],
                                  ["encode.image_pyramid=[4, 16]", "sides [16]"], True),
    "VAE folder without config.json": (["vae.spec={no_config}"], ["vae.spec", "config.json"], True),
    "VAE of an unsupported class": (["vae.spec={other_kind}"], ["vae.spec", "AutoencoderOobleck"],
                                    True),
    "VAE path that does not exist": (["vae.spec={missing}"], ["vae.spec", "no such file or folder"],
                                     True),
}


@pytest.mark.parametrize("case", list(ENCODE_CASES))
def test_encode_refuses_at_config_read_print_config_and_run(case, tmp_path, vae_folder, home, capsys):
    from pipelines.core.config import load_config
    from pipelines.encode import EncodeConfig, load_encode_config, run_encode

    (tmp_path / "no-config").mkdir()
    (tmp_path / "other-kind").mkdir()
    (tmp_path / "other-kind" / "config.json").write_text('{"_class_name": "AutoencoderOobleck"}')
    paths = {k: tmp_path / k.replace("_", "-") for k in ("no_config", "other_kind", "missing")}
    overrides, keys, needs_vae_config = ENCODE_CASES[case]
    out = tmp_path / "latents"
    args = [f"vae.spec={vae_folder}", f"output={out}", *(o.format(**paths) for o in overrides)]
    message = refused(load_encode_config, ENCODE, args)
    assert_names(message, keys)
    expected = f"flowar encode: configuration error: {message}\n"
    assert cli(capsys, "encode", ENCODE, *args, "--print-config") == (2, expected)
    assert cli(capsys, "encode", ENCODE, *args) == (2, expected)
    if needs_vae_config:
        # A config read without the job's load function (the quickstart's, before its VAE
        # exists) is refused by run_encode with the same message, before it lists the source
        # or loads weights (this folder has none).
        assert refused(run_encode, load_config(EncodeConfig, ENCODE, args)) == message
    else:
        assert refused(load_config, EncodeConfig, ENCODE, args) == message
    assert not out.exists() and not home.exists()


def test_encode_load_needs_no_vae_when_its_config_cannot_say(tmp_path):
    """A hub id is checked once run_encode has loaded it: the config read does not go online."""
    from pipelines.encode import load_encode_config, vae_downsample

    cfg = load_encode_config(ENCODE, ["vae.spec=org/some-vae", f"output={tmp_path / 'o'}",
                                      "encode.resolution=30"])
    assert cfg.vae.spec == "org/some-vae"
    assert vae_downsample("org/some-vae") is None
    # An LDM checkpoint's factor comes from vae.ldm_config; a .ckpt may carry its own config
    # (which load_vae prefers to <file>.json), so only a .safetensors' <file>.json is read.
    ckpt = tmp_path / "kl.ckpt"
    ckpt.write_bytes(b"not read")
    (tmp_path / "kl.ckpt.json").write_text(json.dumps({"ch_mult": [1, 1, 2, 2, 4]}))
    assert vae_downsample(str(ckpt)) is None
    assert vae_downsample(str(ckpt), {"ch_mult": [1, 2, 4]}) == 4
    st = tmp_path / "kl.safetensors"
    st.write_bytes(b"not read")
    assert vae_downsample(str(st)) is None
    (tmp_path / "kl.safetensors.json").write_text(json.dumps({"ch_mult": [1, 1, 2, 2, 4]}))
    assert vae_downsample(str(st)) == 16
    with pytest.raises(ConfigError, match=r"encode.resolution=40 is not a multiple .* factor 16"):
        load_encode_config(ENCODE, [f"vae.spec={st}", f"output={tmp_path / 'o'}",
                                    "encode.resolution=40"])
    load_encode_config(ENCODE, [f"vae.spec={ckpt}", f"output={tmp_path / 'o'}",
                                "encode.resolution=40"])  # left to run_encode


# ------------------------------------------------------------------------------------ flowar vae train

VAE_CASES = {
    "empty output": (["output="], ["output is empty"]),
    "resolution vs levels": (["resolution=30"], ["resolution=30", "2^2",
                                                  "model.block_out_channels=[16, 32, 32]"]),
    "resolution=0": (["resolution=0"], ["resolution=0"]),
    "no levels": (["model.block_out_channels=[]"], ["model.block_out_channels=[]"]),
    "channels vs groups": (["model.block_out_channels=[16,24]"],
                           ["model.block_out_channels=[16, 24]", "model.norm_num_groups=16"]),
    "norm_num_groups=0": (["model.norm_num_groups=0"], ["model.norm_num_groups=0"]),
    "layers_per_block=0": (["model.layers_per_block=0"], ["model.layers_per_block=0"]),
    "latent_channels=0": (["model.latent_channels=0"], ["model.latent_channels=0"]),
    "steps=0": (["train.steps=0"], ["train.steps=0"]),
    "batch_size=0": (["train.batch_size=0"], ["train.batch_size=0"]),
    "shuffle_buffer=0": (["train.shuffle_buffer=0"], ["train.shuffle_buffer=0"]),
    "num_workers=0": (["train.num_workers=0"], ["train.num_workers=0"]),
    "log_every=0": (["train.log_every=0"], ["train.log_every=0"]),
    "image_every=0": (["train.image_every=0"], ["train.image_every=0"]),
    "lr=0": (["train.lr=0"], ["train.lr=0"]),
    "kl_weight<0": (["train.kl_weight=-1"], ["train.kl_weight=-1"]),
}


@pytest.mark.parametrize("case", list(VAE_CASES))
def test_vae_train_refuses_at_config_read_print_config_and_run(case, tmp_path, home, capsys):
    from pipelines.core.config import load_config
    from pipelines.vae_train import VAETrainConfig

    overrides, keys = VAE_CASES[case]
    out = tmp_path / "vae"
    args = [f"output={out}", *overrides]
    message = refused(load_config, VAETrainConfig, VAE, args)
    assert_names(message, keys)
    expected = f"flowar vae train: configuration error: {message}\n"
    assert cli(capsys, "vae", "train", VAE, *args, "--print-config") == (2, expected)
    assert cli(capsys, "vae", "train", VAE, *args) == (2, expected)
    assert not out.exists() and not home.exists()


def test_run_vae_train_refuses_an_edited_config_before_mlflow(tmp_path, home):
    from pipelines.core.config import load_config
    from pipelines.vae_train import VAETrainConfig, run_vae_train

    cfg = load_config(VAETrainConfig, VAE, [f"output={tmp_path / 'vae'}"])
    cfg.resolution = 30
    message = refused(run_vae_train, cfg)
    assert message == refused(load_config, VAETrainConfig, VAE, [f"output={tmp_path / 'vae'}",
                                                                 "resolution=30"])
    assert not home.exists()


# ------------------------------------------------------------------ flowar evaluate, flowar sample

@pytest.fixture(scope="module")
def diffusion_export(tmp_path_factory):
    """A tiny model folder trained with the diffusion objective (it samples with DDIM only)."""
    from flowar import FlowAR

    out = tmp_path_factory.mktemp("diffusion") / "export"
    FlowAR.from_preset("tiny", objective="diffusion").save_pretrained(out)
    return out


@pytest.mark.parametrize("solver", ["heun", "sde"])
def test_evaluate_and_sample_refuse_a_sampler_the_export_cannot_use(solver, diffusion_export,
                                                                    home, tmp_path, capsys):
    """The export's objective is read from its config.json when the config is read, so neither
    --print-config nor the run gets to generate() with it."""
    from pipelines.evaluate.job import EvalConfig, check_sampler_for_export
    from pipelines.core.config import load_config

    cfg = load_config(EvalConfig, ROOT / "configs" / "eval-quickstart.yaml",
                      [f"generation.checkpoint={diffusion_export}", f"sampler.solver={solver}"])
    message = refused(check_sampler_for_export, cfg.generation.checkpoint, cfg.sampler)
    assert_names(message, [f"sampler.solver='{solver}'", "model.objective='diffusion'"])
    args = [ROOT / "configs" / "eval-quickstart.yaml", f"generation.checkpoint={diffusion_export}",
            f"sampler.solver={solver}"]
    expected = f"flowar evaluate: configuration error: {message}\n"
    assert cli(capsys, "evaluate", *args, "--print-config") == (2, expected)
    assert cli(capsys, "evaluate", *args) == (2, expected)
    out = tmp_path / "grid.png"
    assert cli(capsys, "sample", diffusion_export, f"sampler.solver={solver}", "--out", out) == (
        2, f"flowar sample: configuration error: {message}\n")
    assert not out.exists() and not home.exists()


@pytest.mark.parametrize("kind", ["folder", "parquet", "webdataset"])
def test_a_source_without_a_path_is_refused_at_read(kind, home, capsys):
    from pipelines.encode import load_encode_config

    args = [ENCODE, f"source.kind={kind}", "source.path="]
    message = refused(load_encode_config, ENCODE, args[1:])
    assert_names(message, ["source.path", f"source.kind={kind}"])
    assert cli(capsys, "encode", *args, "--print-config") == (
        2, f"flowar encode: configuration error: {message}\n")
