"""Datasets as the inputs of MLflow runs: the run page's Datasets, the runs table's Dataset column.

A training run lists the latent dataset it read (context "training") and the reference its
in-training evaluation compared against (context "evaluation"); a `flowar evaluate` run lists
its reference. Nothing here reads data: a dataset is named by its path or URI and identified by
the digest it already carries (pipelines.data.latents.LatentDataset.digest,
pipelines.evaluate.reference.reference_digest), so logging costs nothing at any dataset size.
"""

from __future__ import annotations

import json
import os
from urllib.parse import urlsplit

__all__ = ["TRAINING", "EVALUATION", "log_dataset"]

TRAINING, EVALUATION = "training", "evaluation"  # MLflow's own context names for run inputs


def _source(where: str) -> tuple[str, str]:
    """(source type, source JSON) as MLflow's dataset sources write them: a URI's scheme (s3, gs,
    ...) or "local" with the absolute path."""
    scheme = urlsplit(where).scheme
    if scheme and len(scheme) > 1:  # not a Windows drive letter
        return scheme, json.dumps({"uri": where})
    return "local", json.dumps({"uri": os.path.abspath(where)})


def log_dataset(c, run_id: str, *, digest: str, where: str, context: str, prefix: str = "",
                profile: dict | None = None) -> None:
    """List the dataset at `where` (path or URI) as an input of `run_id` in `context`, named
    `prefix` + its folder's name. `profile`: a few facts the UI shows beside it (rows,
    resolution, VAE). Logging the same dataset again (a resumed run) leaves one entry."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type, source = _source(where)
    name = prefix + (where.rstrip("/").rsplit("/", 1)[-1] or where)
    dataset = Dataset(name=name, digest=digest[:36], source_type=source_type, source=source,
                      profile=json.dumps(profile or {}, default=str))
    c.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])])
