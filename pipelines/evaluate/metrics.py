"""Metrics of generated images from Inception features: FID, IS, KID, precision/recall.

FID needs only (mu, sigma), so each worker returns mergeable float64 statistics (count, sum,
sum of outer products) and the driver adds them: the result does not depend on how the samples
were split. The metric formulas are torch-fidelity's own functions (fid: eigenvalues of
sigma1 @ sigma2; kid: polynomial-kernel MMD over random subsets; prc: k-NN manifolds; isc:
shuffled splits), called on the merged data, so a distributed evaluation gives torch-fidelity's
single-process numbers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric

from pipelines.core import storage


@dataclass
class FeatureStats:
    """count, sum and sum of outer products of feature vectors, in float64: adds exactly."""
    count: int
    sum: np.ndarray  # (D,)
    outer: np.ndarray  # (D, D)

    @classmethod
    def empty(cls, dim: int) -> "FeatureStats":
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureStats":
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2:
            raise ValueError(f"features must be (N, D), got shape {f.shape}")
        return cls(len(f), f.sum(axis=0), f.T @ f)

    def __add__(self, other: "FeatureStats") -> "FeatureStats":
        return FeatureStats(self.count, self.sum.copy(), self.outer.copy()).add_(other)

    def add_(self, other: "FeatureStats") -> "FeatureStats":
        """Add `other` in place: the driver's running total never holds a second (D, D) array."""
        if self.sum.shape != other.sum.shape:
            raise ValueError(f"cannot merge statistics of dims {self.sum.shape} and {other.sum.shape}")
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        return self

    @staticmethod
    def merge(parts) -> "FeatureStats":
        """The sum of `parts`, added one at a time in the order given (float64 addition is not
        associative: callers that need bit-equal totals give a fixed order, e.g. shard index)."""
        total = None
        for p in parts:
            total = FeatureStats(p.count, p.sum.copy(), p.outer.copy()) if total is None else total.add_(p)
        if total is None:
            raise ValueError("no statistics to merge")
        return total

    def mu_sigma(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (np.cov's N-1), as torch-fidelity computes them."""
        if self.count < 2:
            raise ValueError(f"need at least 2 samples for a covariance, have {self.count}")
        mu = self.sum / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, sigma

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}count": np.array(self.count), f"{prefix}sum": self.sum, f"{prefix}outer": self.outer}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "") -> "FeatureStats":
        return cls(int(arrays[f"{prefix}count"]), np.asarray(arrays[f"{prefix}sum"], np.float64),
                   np.asarray(arrays[f"{prefix}outer"], np.float64))


def fid(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance, torch-fidelity's formula (eigenvalues of sigma1 @ sigma2)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"FID of statistics with different shapes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    out = fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)
    return float(out["frechet_inception_distance"])


def kid(features_gen: np.ndarray, features_ref: np.ndarray, subsets: int = 100,
        subset_size: int = 1000, seed: int = 2020) -> tuple[float, float]:
    """KID (mean, std) with torch-fidelity's cubic polynomial kernel; subset_size is capped at
    the smaller set, so small evaluations still report a number (recorded in the report)."""
    size = min(subset_size, len(features_gen), len(features_ref))
    out = kid_features_to_metric(torch.from_numpy(np.asarray(features_gen, np.float32)),
                                 torch.from_numpy(np.asarray(features_ref, np.float32)),
                                 kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False,
                                 kid_kernel="poly", kid_kernel_poly_degree=3,
                                 kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def precision_recall(features_gen: np.ndarray, features_ref: np.ndarray, k: int = 3,
                     batch_size: int = 10000) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al.) with k-NN manifolds, torch-fidelity's code."""
    out = prc_features_to_metric(torch.from_numpy(np.asarray(features_gen, np.float32)),
                                 torch.from_numpy(np.asarray(features_ref, np.float32)),
                                 prc_neighborhood=k, prc_batch_size=batch_size, save_cpu_ram=False,
                                 verbose=False)
    return out["precision"], out["recall"]


def inception_score(logits: np.ndarray | None, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """IS (mean, std) from the unbiased logits, through IscSums (all logits added at once).
    Refuses when there are none: a classifier with zero weights gives IS = 1.0, a number that
    means nothing."""
    if logits is None or len(logits) == 0:
        raise ValueError("Inception Score is unavailable: the Inception weights have no logits layer "
                         "(fid-helper's copy stops at the pool features); use torch-fidelity's weights file")
    sums = IscSums(len(logits), splits, seed)
    sums.add(0, logits)
    return sums.result()


class IscSums:
    """The Inception Score of torch-fidelity's isc_features_to_metric, from sums added shard by
    shard: no logits are kept. torch-fidelity shuffles the N samples with RandomState(seed), cuts
    them into `splits` chunks and takes exp(mean over the chunk of KL(p(y|x) || q(y))), q the
    chunk's mean p. Per chunk, KL summed over its n samples is A - sum_y S(y) log(S(y) / n), with
    A = sum_x sum_y p log p and S = sum_x p(y|x): both add up sample by sample. Sample i's chunk
    is its position in the same permutation, so the chunks are torch-fidelity's."""

    def __init__(self, count: int, splits: int = 10, seed: int = 2020):
        perm = np.random.RandomState(seed).permutation(count)
        position = np.empty(count, np.int64)
        position[perm] = np.arange(count)
        bounds = np.array([i * count // splits for i in range(splits)])
        self.chunk_of = (np.searchsorted(bounds, position, side="right") - 1).astype(np.int32)
        self.count, self.splits, self.seen = count, splits, 0
        self.plogp = np.zeros(splits, np.float64)
        self.psum: np.ndarray | None = None  # (splits, classes), sized by the first logits

    def add(self, start: int, logits: np.ndarray) -> None:
        """Logits of samples start, start+1, ... (float64 softmax, as torch-fidelity's)."""
        lg = torch.from_numpy(np.asarray(logits, np.float32)).double()
        p, log_p = lg.softmax(dim=1), lg.log_softmax(dim=1)
        chunk = self.chunk_of[start:start + len(lg)]
        if self.psum is None:
            self.psum = np.zeros((self.splits, lg.shape[1]), np.float64)
        np.add.at(self.plogp, chunk, (p * log_p).sum(dim=1).numpy())
        np.add.at(self.psum, chunk, p.numpy())
        self.seen += len(lg)

    def result(self) -> tuple[float, float]:
        if self.seen != self.count:
            raise ValueError(f"Inception Score of {self.count} samples, but {self.seen} were added")
        n = np.bincount(self.chunk_of, minlength=self.splits)
        scores = []
        for i in range(self.splits):
            s = self.psum[i]
            cross = np.where(s > 0, s * np.log(np.where(s > 0, s, 1.0) / n[i]), 0.0).sum()
            scores.append(float(np.exp((self.plogp[i] - cross) / n[i])))
        return float(np.mean(scores)), float(np.std(scores))


def feature_subset(count: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of the samples whose features KID and precision/recall use: all of them
    when count <= size, else `size` drawn without replacement by numpy's Generator(seed). A
    function of (count, size, seed) only, so the same at any worker count; drawn (not the first
    `size`) because samples and reference folders are ordered by class."""
    if count <= size:
        return np.arange(count, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False)).astype(np.int64)


def requested_metrics(m, generated: dict, reference: dict) -> dict[str, float | str]:
    """The metrics the config's `metrics` section asks for, from merged generated and reference
    data (pipelines/evaluate/fold.py's Summary.result). KID and precision/recall use the feature
    subsets (metrics.feature_subset_size of each set). A metric that cannot be computed (IS
    without a logits layer; KID or precision/recall against a statistics file) is a string
    saying why, never a number."""
    results: dict[str, float | str] = {}
    if m.fid:
        mu, sigma = generated["stats"].mu_sigma()
        results["fid"] = fid(mu, sigma, reference["mu"], reference["sigma"])
    if m.isc:
        if generated.get("isc") is None:
            results["inception_score"] = "unavailable: the Inception weights have no logits layer"
        else:
            results["inception_score"], results["inception_score_std"] = generated["isc"].result()
    for name, wanted in (("kid", m.kid), ("precision/recall", m.prc)):
        if wanted and reference["features"] is None:
            results[name] = "unavailable: the reference is a statistics file without features"
    if m.kid and reference["features"] is not None:
        results["kid"], results["kid_std"] = kid(generated["features"], reference["features"],
                                                 m.kid_subsets, m.kid_subset_size)
    if m.prc and reference["features"] is not None:
        results["precision"], results["recall"] = precision_recall(
            generated["features"], reference["features"], m.prc_neighborhood)
    return results


# ---------------------------------------------------------------------------------------------
# Reference statistics files
# ---------------------------------------------------------------------------------------------

def load_reference_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an ADM-style reference file (`mu`, `sigma`; e.g. VIRTUAL_imagenet256_labeled.npz,
    MAR's adm_in256_stats.npz) or one written by `save_reference`; a local path or a storage URI."""
    if storage.is_uri(path):
        if not storage.exists(path):
            raise FileNotFoundError(f"reference statistics {str(path)!r} do not exist")
        with storage.local_file(path) as local:
            return _reference_arrays(local, str(path))
    if not Path(path).is_file():
        raise FileNotFoundError(f"reference statistics {str(path)!r} do not exist")
    return _reference_arrays(Path(path), str(path))


def _reference_arrays(p: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(p) as z:
        if "mu" in z and "sigma" in z:
            mu, sigma = np.asarray(z["mu"], np.float64), np.asarray(z["sigma"], np.float64)
        elif "count" in z:
            return FeatureStats.from_arrays(z).mu_sigma()
        else:
            raise ValueError(f"{name}: no 'mu'/'sigma' arrays (has {sorted(z.files)}); expected an "
                             "ADM-style reference batch .npz")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)")
    return mu, sigma


def save_reference(path: str | Path, stats: FeatureStats, features: np.ndarray | None = None,
                   meta: dict | None = None) -> None:
    """Stats (+ mu/sigma for ADM-style readers, + features for PR/KID) in one .npz, atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    mu, sigma = stats.mu_sigma()
    arrays = {**stats.to_arrays(), "mu": mu, "sigma": sigma,
              "meta": np.array(json.dumps(meta or {}, sort_keys=True))}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, p)
