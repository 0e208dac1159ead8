"""The parts of `flowar evaluate` that keep the driver's memory flat, without Ray: the in-order
fold of shard results, the streamed Inception Score, the feature subsets, the reference folder
read by ranges, the output folder at a URI, and the metrics keys refused when the config is read."""

from __future__ import annotations

import numpy as np
import pytest


def _shard(start: int, end: int, rng) -> dict:
    """A shard result as a worker returns it (features of every index kept)."""
    from pipelines.evaluate.metrics import FeatureStats

    f = rng.standard_normal((end - start, 16)).astype(np.float32)
    return {**FeatureStats.of(f).to_arrays(), "start": start, "end": end, "resolution": 8,
            "feature_idx": np.arange(start, end), "features": f,
            "logits": rng.standard_normal((end - start, 5)).astype(np.float32) * 3}


def test_fold_in_index_order_is_bit_equal_whatever_the_arrival(tmp_path):
    import contextlib

    from pipelines.evaluate.fold import InOrder, Summary
    from pipelines.evaluate.metrics import FeatureStats, IscSums

    rng = np.random.default_rng(0)
    shards = [(s, min(s + 7, 40)) for s in range(0, 40, 7)]
    results = {s: _shard(*s, rng) for s in shards}

    def fold(order):
        summary = Summary(want_features=True, isc=IscSums(40, splits=4))
        folder = InOrder(shards, lambda s: contextlib.nullcontext(results[s]), summary)
        for s in order:
            folder.arrived(s, results[s])
        assert folder.done
        return summary.result(), folder.read_back

    (a, read_a), (b, read_b) = fold(shards), fold(shards[::-1])
    assert read_a == 0 and read_b == len(shards) - 1  # only early arrivals are read back
    np.testing.assert_array_equal(a["stats"].outer, b["stats"].outer)
    np.testing.assert_array_equal(a["features"], b["features"])
    assert a["isc"].result() == b["isc"].result()
    whole = np.concatenate([results[s]["features"] for s in shards]).astype(np.float64)
    np.testing.assert_allclose(a["stats"].outer, whole.T @ whole, rtol=1e-12)
    np.testing.assert_array_equal(a["feature_idx"], np.arange(40))
    assert a["stats"].count == 40 and isinstance(a["stats"], FeatureStats)


def test_streamed_inception_score_is_torch_fidelitys():
    import torch
    from torch_fidelity.metric_isc import isc_features_to_metric

    from pipelines.evaluate.metrics import IscSums

    logits = np.random.default_rng(1).standard_normal((103, 1008)).astype(np.float32) * 4
    ref = isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True, rng_seed=2020)
    sums = IscSums(103, splits=10)
    for s in range(0, 103, 20):  # shard by shard
        sums.add(s, logits[s:s + 20])
    mean, std = sums.result()
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-7, abs=1e-10)
    with pytest.raises(ValueError, match="103 samples, but 20"):
        short = IscSums(103)
        short.add(0, logits[:20])
        short.result()


def test_feature_subset_is_bounded_drawn_and_fixed():
    from pipelines.evaluate.metrics import feature_subset

    a = feature_subset(1_281_167, 10_000, 0)
    assert len(a) == 10_000 and len(np.unique(a)) == 10_000 and (np.diff(a) > 0).all()
    assert a[-1] > 1_200_000  # drawn over the whole range, not the first classes
    np.testing.assert_array_equal(a, feature_subset(1_281_167, 10_000, 0))
    assert not np.array_equal(a, feature_subset(1_281_167, 10_000, 1))
    np.testing.assert_array_equal(feature_subset(12, 10_000, 0), np.arange(12))


@pytest.mark.parametrize("override, key", [
    ("metrics.feature_subset_size=1", "metrics.feature_subset_size"),
    ("metrics.kid_subset_size=20000", "metrics.kid_subset_size"),
    ("metrics.kid_subsets=0", "metrics.kid_subsets"),
    ("metrics.prc_neighborhood=10000", "metrics.prc_neighborhood"),
    ("metrics.isc_splits=51", "metrics.isc_splits"),
])
def test_bad_metrics_keys_are_refused_when_read(override, key):
    from flowar.config import ConfigError
    from pipelines.core.config import load_config
    from pipelines.evaluate.config import EvalConfig

    base = ["generation.checkpoint=x", "reference.source=fashion-mnist", "generation.num_samples=50"]
    assert load_config(EvalConfig, None, base).metrics.feature_subset_size == 10000
    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + "=.* is invalid"):
        load_config(EvalConfig, None, base + [override])


@pytest.fixture
def folder(tmp_path):
    """An ImageNet-style folder: class folders of PNGs (one nested deeper), plus non-images."""
    from PIL import Image

    root = tmp_path / "ref"
    sizes = {"b_cls": 3, "a_cls": 4, "a_cls/deeper": 2, "c_cls": 1}
    for k, (rel, n) in enumerate(sizes.items()):
        (root / rel).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((6, 6, 3), 20 * k + i, np.uint8)).save(root / rel / f"{i:02d}.png")
    (root / "a_cls" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(root / ".hidden" / "x.png")
    return root


def test_reference_folder_is_read_by_ranges(folder):
    from pipelines.evaluate.reference import range_call, read_range, reference_spec

    spec = reference_spec(str(folder))
    assert spec["count"] == 10 and spec["dirs"] == [["a_cls", 4], ["a_cls/deeper", 2], ["b_cls", 3], ["c_cls", 1]]
    whole = read_range(range_call(spec, 0, 10), 0, 10, 6)[:, 0, 0, 0]
    assert whole.tolist() == [20, 21, 22, 23, 40, 41, 0, 1, 2, 60]  # the walk order
    call = range_call(spec, 3, 9)  # spans three directories; the call names only those
    assert [seg[0] for seg in call["segments"]] == ["a_cls", "a_cls/deeper", "b_cls"]
    got = np.concatenate([read_range(call, s, min(s + 4, 9), 6) for s in range(3, 9, 4)])
    assert got[:, 0, 0, 0].tolist() == whole[3:9].tolist()
    assert reference_spec(str(folder), max_images=5)["count"] == 5
    (folder / "b_cls" / "03.png").write_bytes((folder / "b_cls" / "00.png").read_bytes())
    from pipelines.evaluate import reference

    reference._LISTED.clear()
    with pytest.raises(RuntimeError, match="changed during the evaluation"):
        read_range(call, 6, 9, 6)
    assert reference_spec(str(folder))["digest"] != spec["digest"]


def test_bad_reference_folders_are_named(tmp_path):
    from pipelines.evaluate.reference import reference_spec

    with pytest.raises(FileNotFoundError, match="not a folder"):
        reference_spec(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        reference_spec(str(tmp_path / "empty"))


def test_output_folder_at_a_uri_writes_and_reads_whole_files():
    """The remote branch of outputs.Folder through fsspec's in-memory filesystem (a URI scheme
    pipelines.core.storage resolves like s3://; the S3 server test is tests/ of the S3 path)."""
    import uuid

    from pipelines.evaluate.outputs import Folder

    out = Folder(f"memory://flowar-eval-{uuid.uuid4().hex}/out")
    assert not out.local and out.names() == set()
    shards = out.child("shards")
    shards.save_npz("000000000-000000004.npz", {"a": np.arange(4), "images": np.zeros((4, 3, 8, 8), np.uint8)})
    out.write_text("settings.json", "{}")
    assert shards.names() == {"000000000-000000004.npz"} and out.read_text("settings.json") == "{}"
    with shards.open_npz("000000000-000000004.npz") as z:
        assert z["a"].tolist() == [0, 1, 2, 3]
    shards.remove()
    assert shards.names() == set()


def test_reference_statistics_at_a_uri(tmp_path):
    import uuid

    from pipelines.evaluate.metrics import FeatureStats, load_reference_npz, save_reference
    from pipelines.evaluate.outputs import Folder

    stats = FeatureStats.of(np.random.default_rng(2).standard_normal((9, 4)))
    save_reference(tmp_path / "ref.npz", stats)
    remote = Folder(f"memory://flowar-eval-{uuid.uuid4().hex}")
    remote.put_file(tmp_path / "ref.npz", "ref.npz")
    mu, sigma = load_reference_npz(f"{remote.uri}/ref.npz")
    np.testing.assert_allclose(sigma, stats.mu_sigma()[1])
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_reference_npz(f"{remote.uri}/missing.npz")
