"""A FlowAR export as an MLflow logged model: the run's Models tab, a `models:/` URI, a registry entry.

`log_export` logs the export folder as a `pyfunc` (pipelines/core/pyfunc_model.py, a
models-from-code file: nothing is pickled) with a signature (class labels in, uint8 images out,
sampler settings as params), at the training step it was exported at. MLflow links the run's
metrics of that step (the final in-training evaluation) to the model; `flowar evaluate` logs its
metrics against the model id that the export's config.json records (`training.mlflow_model_id`).

The model carries the `flowar` package (code/) and, when the dataset's VAE is a local folder, a
copy of it, so `mlflow.pyfunc.load_model("models:/<id>")` works on a machine that has neither.
"""

from __future__ import annotations

import json
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
FLOWAR_PACKAGE = Path(__file__).resolve().parents[2] / "flowar"
# What the pyfunc imports at load (flowar's own dependencies); pinned to the versions that wrote it.
REQUIREMENTS = ("torch", "diffusers", "einops", "timm", "safetensors", "huggingface_hub", "numpy",
                "pandas")
MODEL_NAME = "model"  # the logged model's name within its run

__all__ = ["log_export", "signature", "requirements", "MODEL_NAME"]


def requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name).split('+')[0]}")  # torch's +cpu/+cu124 local tag
        except PackageNotFoundError:
            out.append(name)
    return out


def signature(export: Path, latents: dict):
    """Input: a `class_label` column. Output: uint8 images (N, H, W, C) at the resolution of
    `latents` (the export's latents.json). Params: the sampler's settings (defaults: the
    export's recommended sampler), the seed and the batch size."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from pipelines.core.pyfunc_model import BATCH_PARAM, SEED_PARAM, sampler_defaults

    res, channels = int(latents["resolution"]), _image_channels(latents)
    kinds = {int: "long", float: "double", str: "string"}
    defaults = sampler_defaults(export)
    params = [ParamSpec(k, kinds[type(v)], v) for k, v in defaults.items() if type(v) in kinds]
    params += [ParamSpec(SEED_PARAM, "long", 0), ParamSpec(BATCH_PARAM, "long", 16)]
    return ModelSignature(inputs=Schema([ColSpec("long", "class_label")]),
                          outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, res, res, channels))]),
                          params=ParamSchema(params))


def _image_channels(latents: dict) -> int:
    """The decoded images' channels: the VAE folder's config says (grey Fashion-MNIST VAEs: 1)."""
    folder = Path(str(latents.get("vae", {}).get("id", "")))
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 3  # a hub or checkpoint VAE: RGB
    return int(config.get("out_channels", 3))


def log_export(uri: str, run_id: str, export: str | Path, step: int, *,
               register: str = "") -> str:
    """Log the local export folder `export` as the run's model at `step`; returns its model id.
    `register`: also register it under this name (a new version)."""
    import mlflow
    from mlflow.models import Model
    from mlflow.pyfunc import _get_pyfunc_model_flavor_name

    export = Path(export)
    latents = json.loads((export / "latents.json").read_text())
    artifacts = {"export": str(export)}
    vae = Path(str(latents["vae"].get("id", "")))
    if vae.is_dir():
        artifacts["vae"] = str(vae)
    # Model.log talks to the process's tracking and registry URIs; only rank 0 calls this.
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # the model belongs to the run's experiment (Model.log would take the process's active one)
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id)
    with warnings.catch_warnings():  # no input example on purpose: it would run the model
        warnings.filterwarnings("ignore", message=".*(input example|type hints).*")
        info = Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                         step=step, python_model=str(PYFUNC_FILE), artifacts=artifacts,
                         code_paths=[str(FLOWAR_PACKAGE)], signature=signature(export, latents),
                         pip_requirements=requirements(), registered_model_name=register or None,
                         model_type="flowar",
                         flavor_name=_get_pyfunc_model_flavor_name(str(PYFUNC_FILE)))
    return info.model_id
