"""In-training evaluation (`train.eval_every`): FID, KID and class accuracy of the EMA weights,
computed by the training workers between steps.

Every `eval_every` steps and at the last step, each rank generates its share of
`train.eval_samples` samples with the EMA weights, turns them into Inception statistics, and one
all-reduce of float64 sums gives rank 0 the metrics. They go into MLflow at that step
(`eval/fid`, `eval/kid`, `eval/class_accuracy`, `eval/seconds`) and into the step's
`ray.train.report`, so a sweep's scheduler (ASHA) acts on them at its rungs.

Why not Ray Train 2.60's own validation hook (`ValidationConfig` with `report(validation=...)`,
alpha): it runs the validation function as a separate Ray task on a reported checkpoint,
asynchronously, and attaches its metrics to that checkpoint later. Tune's report callback has
by then forwarded the report without them, so ASHA could not stop trials on eval/fid; the task
also needs CPUs or GPUs beside the workers' (a sweep trial reserves only its workers) and would
reload the checkpoint that the workers hold in memory.

The samples are `flowar evaluate`'s (pipelines/evaluate/worker.py EvalWorker, the same code):
sample i has class i // ceil(eval_samples / num_classes) and noise seeded from (eval_seed, i),
in batches [k*B, (k+1)*B) of train.eval_batch_size; rank r makes the batches k with
k % world == r. So the last step's numbers equal `flowar evaluate` of the export with
num_samples = eval_samples, samples_per_class as above, seed = eval_seed, batch_size = B and the
same reference, at any worker count (up to float64 summation order).

The reference statistics are computed once, by all ranks the same way, and cached by rank 0
under the key `flowar evaluate` uses (pipelines/evaluate/shards.py reference_key), so an
evaluation of the same reference and resolution reuses them, and so does the next training run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from flowar import FlowAR
from flowar.config import to_dict
from pipelines.core.images import from_uint8
from pipelines.evaluate.metrics import (FeatureStats, feature_subset, fid, kid,
                                        load_reference_npz, save_reference)
from pipelines.evaluate.reference import checked_reference_spec, range_call
from pipelines.evaluate.shards import load_cached_reference, reference_cache_file
from pipelines.evaluate.worker import EvalWorker
from pipelines.train.config import TrainJobConfig

__all__ = ["InTrainingEval", "samples_per_class", "SUBSET", "check_eval_inputs"]

SUBSET = (10000, 0)  # KID's feature subset (size, seed): flowar evaluate's metrics defaults
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000


def samples_per_class(job: TrainJobConfig) -> int:
    """The class layout of the samples: index i has class i // this (flowar evaluate's
    generation.samples_per_class), so every class gets its share."""
    return math.ceil(job.train.eval_samples / job.model.num_classes)


def check_eval_inputs(job: TrainJobConfig, vae: dict) -> dict | None:
    """On the driver, before any worker starts: the reference can be read, the classifier folder
    holds a classifier, and the dataset names a VAE that a worker can load (a local VAE folder
    must exist). Returns the reference spec (None when evaluation is off); raises ValueError
    naming the key."""
    tc = job.train
    if not tc.eval_every:
        return None
    try:
        spec = checked_reference_spec(tc.eval_reference, tc.eval_reference_images)
    except (OSError, ValueError) as e:
        raise ValueError(f"train.eval_reference: {e}") from None
    if tc.eval_classifier and not (Path(tc.eval_classifier) / "classifier.safetensors").is_file():
        raise ValueError(f"train.eval_classifier={tc.eval_classifier!r} holds no "
                         "classifier.safetensors (pipelines/evaluate/classifier.py writes one)")
    vae_id = str((vae or {}).get("id", ""))
    if not vae_id or (vae_id.startswith(("/", ".", "~")) and not Path(vae_id).expanduser().exists()):
        raise ValueError(f"train.eval_every needs images: the dataset's VAE {vae_id or '(none)'!r} "
                         "cannot be loaded here to decode the samples")
    return spec


class InTrainingEval:
    """One rank's evaluator: the Inception network, the VAE, the classifier and a generator
    model, loaded at the first evaluation and kept."""

    def __init__(self, job: TrainJobConfig, vae: dict, reference: dict, device: torch.device,
                 rank: int, world: int):
        self.job, self.tc, self.reference = job, job.train, reference
        self.device, self.rank, self.world = device, rank, world
        self.spec = {"vae": vae, "seed": self.tc.eval_seed, "samples_per_class": samples_per_class(job),
                     "sampler": to_dict(job.sampler), "checkpoint": "", "ema_file": ""}
        self.worker: EvalWorker | None = None
        self.classifier = None

    def _setup(self, weights: dict[str, torch.Tensor]) -> EvalWorker:
        if self.worker is None:
            self.worker = EvalWorker({"weights": "", "allow_download": True}, None, str(self.device))
            self.worker.use_generator(FlowAR(self.job.model.architecture()), self.spec)
            if self.tc.eval_classifier:
                from pipelines.evaluate.classifier import load_classifier

                self.classifier = load_classifier(self.tc.eval_classifier).to(self.device)
        self.worker.model.load_state_dict(weights, strict=True)
        return self.worker

    @torch.no_grad()
    def __call__(self, weights: dict[str, torch.Tensor]) -> dict[str, float]:
        """Every rank calls it with the full EMA state (plus buffers); rank 0 gets the metrics,
        the others {}."""
        t0 = time.perf_counter()
        worker = self._setup(weights)
        n, b = self.tc.eval_samples, self.tc.eval_batch_size
        subset = feature_subset(n, *SUBSET) if self.tc.eval_kid else None
        stats, feats, correct, resolution = self._my_batches(worker, n, b, subset, None, 0)
        stats, feats, correct, resolution = self._reduce(stats, feats, correct, resolution)
        ref, ref_seconds = self._reference(worker, resolution)
        if self.rank != 0:
            return {}
        mu, sigma = stats.mu_sigma()
        out = {"eval/fid": fid(mu, sigma, ref["mu"], ref["sigma"])}
        if subset is not None and ref.get("features") is not None:
            size = min(KID_SUBSET_SIZE, len(feats), len(ref["features"]))
            out["eval/kid"], out["eval/kid_std"] = kid(feats, ref["features"], KID_SUBSETS, size)
        if self.classifier is not None:
            out["eval/class_accuracy"] = correct / n
        if ref_seconds:
            out["eval/reference_seconds"] = ref_seconds
        out["eval/seconds"] = time.perf_counter() - t0
        return out

    def _my_batches(self, worker: EvalWorker, count: int, batch: int, subset, source,
                    resolution: int):
        """This rank's batches k (k % world == rank) of [0, count): generated (source None) or
        read from the reference; (stats, {index: features}, correct classifications, resolution)."""
        stats, feats, correct = FeatureStats.empty(2048), {}, 0
        for k in range(self.rank, math.ceil(count / batch), self.world):
            start, end = k * batch, min((k + 1) * batch, count)
            keep = [] if subset is None else subset[(subset >= start) & (subset < end)].tolist()
            call = {} if source is None else {"source": range_call(source, start, end),
                                               "resolution": resolution}
            r = worker.run_shard(start, end, batch, keep=keep,
                                 keep_images=source is None and self.classifier is not None, **call)
            stats.add_(FeatureStats.from_arrays(r))
            feats.update(zip(r["feature_idx"].tolist(), r["features"]))
            resolution = int(r["resolution"])
            if "images" in r:
                correct += self._correct(r["images"], start, end)
        return stats, feats, correct, resolution

    def _correct(self, images: np.ndarray, start: int, end: int) -> int:
        from pipelines.evaluate.classifier import to_grey

        labels = torch.tensor([i // self.spec["samples_per_class"] % self.job.model.num_classes
                               for i in range(start, end)], device=self.device)
        x = from_uint8(torch.from_numpy(images)).to(self.device)
        return int((self.classifier(to_grey(x)).argmax(-1) == labels).sum())

    def _reduce(self, stats: FeatureStats, feats: dict, correct: int, resolution: int = 0):
        """Sum the ranks' statistics (float64 all-reduce) and gather the kept features on every
        rank, in index order, with the images' resolution (a rank with no batch has none)."""
        flat = torch.from_numpy(np.concatenate([[stats.count, correct], stats.sum, stats.outer.ravel()]))
        flat = flat.to(self.device)
        dist.all_reduce(flat)
        flat = flat.cpu().numpy()
        d = stats.sum.shape[0]
        total = FeatureStats(int(flat[0]), flat[2:2 + d].copy(), flat[2 + d:].reshape(d, d).copy())
        parts = [None] * self.world
        dist.all_gather_object(parts, (feats, resolution))
        merged = {i: f for p, _ in parts for i, f in p.items()}
        kept = np.stack([merged[i] for i in sorted(merged)]) if merged else None
        return total, kept, int(flat[1]), max(r for _, r in parts)

    def _reference(self, worker: EvalWorker, resolution: int) -> tuple[dict, float]:
        """The reference's {mu, sigma, features}: a statistics .npz, rank 0's cache, or computed
        now by every rank and cached by rank 0. Every rank calls it (the flag is collective)."""
        tc, spec = self.tc, self.reference
        if spec["kind"] == "npz":
            mu, sigma = load_reference_npz(tc.eval_reference) if self.rank == 0 else (None, None)
            return {"mu": mu, "sigma": sigma, "features": None}, 0.0
        sub = list(SUBSET) if tc.eval_kid else None
        path = reference_cache_file(spec, resolution, worker.inception.info.digest, sub)
        cached = [path.is_file()] if self.rank == 0 else [None]
        dist.broadcast_object_list(cached, src=0)
        if cached[0]:
            return (load_cached_reference(path) if self.rank == 0 else {}), 0.0
        t0 = time.perf_counter()
        count = spec["count"]
        subset = feature_subset(count, *SUBSET) if tc.eval_kid else None
        stats, feats, _, _ = self._my_batches(worker, count, tc.eval_batch_size, subset, spec,
                                              resolution)
        stats, kept, _, _ = self._reduce(stats, feats, 0)
        if self.rank == 0:
            save_reference(path, stats, kept, {"source": tc.eval_reference, "resolution": resolution,
                                               "extractor": worker.inception.info.id})
            mu, sigma = stats.mu_sigma()
            return {"mu": mu, "sigma": sigma, "features": kept}, time.perf_counter() - t0
        return {}, 0.0

