"""The MLflow model of a FlowAR export: class labels in, images out.

A models-from-code file (https://mlflow.org/docs/latest/ml/model/models-from-code/): MLflow
copies this file into the logged model and runs it when the model is loaded, so no code is
pickled. It imports only `flowar` (carried in the model's code/ folder), torch and MLflow.

    model = mlflow.pyfunc.load_model("models:/m-...")
    images = model.predict(pandas.DataFrame({"class_label": [0, 3, 7]}),
                           params={"cfg": 2.0, "num_steps": 25, "seed": 1})
    images.shape  # (3, H, W, C) uint8, channels last

The artefacts are the export folder (`export`: config.json, model.safetensors, latents.json,
and the sampler grid's sampler.json when one was run) and, when the dataset's VAE is a local
folder, a copy of it (`vae`); a hub VAE is loaded by its id. Sampler settings default to the
export's sampler.json (the best of `flowar evaluate`'s grid), else to the library's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel

SEED_PARAM, BATCH_PARAM = "seed", "batch_size"


def sampler_defaults(export: Path) -> dict:
    """The sampler the export recommends: sampler.json's best setting, else SamplerConfig()."""
    from flowar.config import SamplerConfig, to_dict
    from flowar.hub import SAMPLER_FILE

    chosen = export / SAMPLER_FILE
    settings = json.loads(chosen.read_text()).get("sampler", {}) if chosen.is_file() else {}
    return to_dict(SamplerConfig(**settings))


class FlowARImages(PythonModel):
    """pyfunc: a DataFrame with a `class_label` column -> uint8 images (N, H, W, C)."""

    def load_context(self, context):
        import torch

        from flowar.model import FlowAR
        from flowar.vae import load_for_latents

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        export = Path(context.artifacts["export"])
        self.model = FlowAR.from_pretrained(export).to(self.device).eval()
        spec = dict(json.loads((export / "latents.json").read_text())["vae"])
        if context.artifacts.get("vae"):
            spec["id"] = context.artifacts["vae"]  # the copy carried by the model
        self.vae, self.info = load_for_latents(spec, self.device)
        self.sampler = sampler_defaults(export)

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        from flowar.config import SamplerConfig
        from flowar.vae import decode, to_uint8

        params = dict(params or {})
        seed, batch = int(params.pop(SEED_PARAM, 0)), int(params.pop(BATCH_PARAM, 16))
        sampler = SamplerConfig(**{**self.sampler, **{k: v for k, v in params.items()
                                                       if k in self.sampler}})
        labels = torch.from_numpy(np.array(model_input["class_label"], dtype=np.int64))  # a copy
        n = self.model.config.num_classes
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < n):
            raise ValueError(f"class_label: values must be in [0, {n - 1}] for this model")
        g = torch.Generator(self.device).manual_seed(seed)
        out = []
        with torch.inference_mode():
            for chunk in labels.split(batch):
                z = self.model.generate(chunk.to(self.device), sampler=sampler, generator=g)
                out.append(to_uint8(decode(self.vae, z, self.info)).permute(0, 2, 3, 1).cpu())
        return torch.cat(out).numpy()


if __name__ != "pipelines.core.pyfunc_model":  # run by MLflow as the model's code, not imported
    mlflow.models.set_model(FlowARImages())
