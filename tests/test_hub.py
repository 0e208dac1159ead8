"""FlowAR exports on the Hugging Face Hub (flowar/hub.py), offline.

Loading by hub id reads a Hub cache laid out here by hand, as huggingface_hub lays it out
(models--org--name/{blobs,snapshots/<commit>,refs/<branch>}); huggingface_hub's own scan_cache_dir
confirms the layout before FlowAR reads it. HF_HUB_OFFLINE stays on: nothing reaches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from flowar import FlowAR
from flowar.config import ConfigError
from flowar.hub import push_export, resolve_export, write_model_card

RUN_ID = "0123456789abcdef0123456789abcdef"
LATENTS = {"format_version": 1, "vae": {"id": "stabilityai/sd-vae-ft-ema", "sha256": "ab" * 32,
                                        "scaling_factor": 0.18215, "shift_factor": 0.0},
           "resolution": 64, "latent_size": 8, "latent_channels": 4, "scales": [8],
           "num_classes": 10, "source": {"kind": "folder", "path": "/data/fashion-mnist"}}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 (tests/conftest.py) is read when huggingface_hub is imported; setting
    the constant too keeps these tests offline even where the environment said otherwise."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def tiny(seed=0) -> FlowAR:
    torch.manual_seed(seed)
    return FlowAR.from_preset("tiny", latent_channels=4, scales=(1, 2, 4, 8), num_classes=10).eval()


def training_export(folder: Path, seed=0) -> FlowAR:
    """What `flowar train` writes at its end: pipelines/train/checkpointing.py export_ema."""
    from pipelines.train.checkpointing import export_ema

    model = tiny(seed)
    ema = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v for k, v in model.state_dict().items() if k not in ema}
    info = {"mlflow_run_id": RUN_ID, "step": 800, "dataset": "/runs/latents-fashion-mnist",
            "ema_decay": 0.9999}
    export_ema(model.config, ema, folder, LATENTS, buffers, info)
    return model


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str, ref: str | None = "main",
                     subfolder: str = "") -> None:
    """Lay `folder` out as huggingface_hub caches a download of `repo_id` at `commit`: the
    content in blobs/, the snapshot as relative symlinks to them, `ref` naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / subfolder / f.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)


def same_weights(a: FlowAR, b: FlowAR) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def card_of(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


# ------------------------------------------------------------------------------------------------

def test_export_card_lists_config_data_run_and_results(tmp_path):
    export = tmp_path / "export"
    training_export(export)
    card = card_of(export)
    assert card.data.library_name == "flowar"
    assert {"flowar", "image-generation", "class-conditional"} <= set(card.data.tags)
    for text in (RUN_ID, "step 800", "latents-fashion-mnist", "stabilityai/sd-vae-ft-ema",
                 "| resolution | 64 |", "| injection | spatial_adaln |", "No results yet"):
        assert text in card.text, text
    assert card.data.eval_results is None

    # What `flowar evaluate` would call afterwards: the card gains the results and keeps the run.
    write_model_card(export, {"fid": 12.5, "inception_score": "unavailable: no logits layer"},
                     {"num_samples": 200, "reference": "fashion-mnist-test"})
    card = card_of(export)
    fid = {r.metric_type: r for r in card.data.eval_results}["fid"]
    assert (fid.metric_value, fid.dataset_name) == (12.5, "fashion-mnist-test")
    assert len(card.data.eval_results) == 1  # a text result is no model-index metric ...
    assert "| inception_score | unavailable: no logits layer |" in card.text  # ... but is shown
    assert RUN_ID in card.text and "| num_samples | 200 |" in card.text
    write_model_card(export)  # rewriting without results keeps them (evaluation.json)
    assert "| fid | 12.5 |" in card_of(export).text
    with pytest.raises(FileNotFoundError, match="config.json"):
        write_model_card(tmp_path / "nowhere", {"fid": 1.0})


def test_hub_id_loads_from_the_offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants, scan_cache_dir

    export, older = tmp_path / "export", tmp_path / "older"
    model = training_export(export, seed=0)
    write_model_card(export, {"fid": 12.5})
    old_model = training_export(older, seed=1)
    cache = tmp_path / "hub"
    put_in_hub_cache(cache, "org/flowar-tiny", export, "a" * 40)
    put_in_hub_cache(cache, "org/flowar-tiny", older, "b" * 40, ref=None)
    put_in_hub_cache(cache, "org/flowar-tiny", older, "a" * 40, ref=None, subfolder="previous")
    repos = {r.repo_id: r for r in scan_cache_dir(cache).repos}  # the library reads our layout
    assert {rev.commit_hash for rev in repos["org/flowar-tiny"].revisions} == {"a" * 40, "b" * 40}

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # the default cache, as HF_HUB_CACHE sets it
    loaded = FlowAR.from_pretrained("org/flowar-tiny")
    assert same_weights(loaded, model) and loaded.config == model.config
    folder = loaded.export_info.folder
    assert folder == (cache / "models--org--flowar-tiny" / "snapshots" / ("a" * 40)).resolve()
    assert json.loads((folder / "latents.json").read_text()) == LATENTS  # the VAE spec comes along
    assert resolve_export("org/flowar-tiny") == folder  # what a pipeline would call for latents.json
    readme = (folder / "README.md").read_text()
    assert RUN_ID in readme and "| fid | 12.5 |" in readme

    # revision (a commit), subfolder and an explicit cache_dir
    assert same_weights(FlowAR.from_pretrained("org/flowar-tiny", revision="b" * 40), old_model)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    sub = FlowAR.from_pretrained("org/flowar-tiny", subfolder="previous", cache_dir=cache)
    assert same_weights(sub, old_model)


def test_hub_id_missing_offline_is_a_clear_error(tmp_path):
    cache = tmp_path / "hub"
    with pytest.raises(FileNotFoundError) as e:
        FlowAR.from_pretrained("org/not-downloaded", cache_dir=cache)
    assert "'org/not-downloaded'" in str(e.value) and "not in the Hub cache" in str(e.value)
    assert "HF_HUB_OFFLINE is set" in str(e.value) and str(cache) in str(e.value)
    training_export(tmp_path / "export")
    put_in_hub_cache(cache, "org/flowar-tiny", tmp_path / "export", "a" * 40)
    with pytest.raises(FileNotFoundError, match=r"'org/flowar-tiny' \(revision 'v2'\).*not in the Hub cache"):
        FlowAR.from_pretrained("org/flowar-tiny", revision="v2", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"org/flowar-tiny \(Hub cache .*\) is not a FlowAR checkpoint"):
        FlowAR.from_pretrained("org/flowar-tiny", subfolder="absent", cache_dir=cache)
    with pytest.raises(ConfigError, match="revision='main' applies to hub ids"):
        FlowAR.from_pretrained(tmp_path / "export", revision="main")


def test_local_folders_load_as_before_even_when_named_like_a_hub_id(tmp_path, monkeypatch):
    model = training_export(tmp_path / "runs" / "export")
    assert same_weights(FlowAR.from_pretrained(tmp_path / "runs" / "export"), model)
    assert same_weights(FlowAR.from_pretrained(str(tmp_path / "runs" / "export")), model)
    monkeypatch.chdir(tmp_path)  # "runs/export" reads org/name, but it is a folder here: local
    loaded = FlowAR.from_pretrained("runs/export")
    assert same_weights(loaded, model) and loaded.export_info.folder == Path("runs/export")
    with pytest.raises(FileNotFoundError, match="nowhere is not a FlowAR checkpoint: config.json"):
        FlowAR.from_pretrained(tmp_path / "nowhere")


class LocalHub:
    """Stands in for the Hub at HfApi's network boundary: create_repo and upload_folder.

    upload_folder is the first call that talks to the Hub (it validates the card's YAML there,
    hashes and uploads); everything before it is ours and runs for real: the export written by
    save_pretrained, the card, the checks, which folder goes to which repo and branch. The
    stand-in copies exactly the files of the folder it is handed into remote/<repo>/<branch>,
    which the test then reads back like a downloaded repo."""

    def __init__(self, root: Path, monkeypatch):
        from huggingface_hub import HfApi, RepoUrl

        self.root, self.calls = root, []

        def create_repo(api, repo_id, **kw):
            self.calls.append(("create_repo", repo_id, kw))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, revision=None, **kw):
            self.calls.append(("upload_folder", repo_id, {"revision": revision, **kw}))
            shutil.copytree(folder_path, root / repo_id / (revision or "main"), dirs_exist_ok=True)
            return f"https://huggingface.co/{repo_id}/commit/{'c' * 40}"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_uploads_the_whole_export(tmp_path, monkeypatch):
    hub = LocalHub(tmp_path / "remote", monkeypatch)
    export = tmp_path / "export"
    training_export(export)
    loaded = FlowAR.from_pretrained(export)
    url = loaded.push_to_hub("org/flowar-tiny", results={"fid": 9.75}, private=True)
    assert url.endswith("/commit/" + "c" * 40)
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][2]["private"] is True and hub.calls[1][2]["repo_type"] == "model"
    remote = tmp_path / "remote" / "org/flowar-tiny" / "main"
    assert sorted(p.name for p in remote.iterdir()) == ["README.md", "config.json", "evaluation.json",
                                                        "latents.json", "model.safetensors"]
    assert same_weights(FlowAR.from_pretrained(remote), loaded)
    assert json.loads((remote / "config.json").read_text())["training"]["mlflow_run_id"] == RUN_ID
    assert json.loads((remote / "latents.json").read_text()) == LATENTS
    card = card_of(remote)
    assert 'FlowAR.from_pretrained("org/flowar-tiny")' in card.text and RUN_ID in card.text
    assert card.data.eval_results[0].metric_value == 9.75

    # An export folder as it is on disk, ema.safetensors and sampler.json included, to a branch.
    shutil.copy(export / "model.safetensors", export / "ema.safetensors")
    (export / "sampler.json").write_text(json.dumps({"sampler": {"cfg": 2.0}, "fid": 9.5}))
    push_export(export, "org/flowar-tiny", branch="ema")
    branch = tmp_path / "remote" / "org/flowar-tiny" / "ema"
    assert {"ema.safetensors", "sampler.json", "latents.json"} <= {p.name for p in branch.iterdir()}
    assert "Recommended sampler" in card_of(branch).text
    assert hub.calls[-1][2]["revision"] == "ema"

    # Refused, naming the input, before anything is uploaded.
    calls = len(hub.calls)
    with pytest.raises(ConfigError, match="'flowar-tiny' is not a Hub repo id"):
        loaded.push_to_hub("flowar-tiny")
    with pytest.raises(FileNotFoundError, match="empty is not a FlowAR export: config.json"):
        push_export(tmp_path / "empty", "org/x")
    assert len(hub.calls) == calls
