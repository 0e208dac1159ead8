"""Our model computes what the published FlowAR code computes (reference vectors in ../shared/golden)."""

import json

import pytest
import torch

from conftest import GOLDEN
from flowar import FlowAR, load_published
from flowar.config import ConfigError
from flowar.published import rename

FILES = ["reference_v1_spatial_adaln.pt", "reference_v2_cross_attn.pt"]


@pytest.fixture(scope="module", params=FILES)
def golden(request):
    data = torch.load(GOLDEN / request.param, weights_only=True)
    model = load_published(data["state_dict"], data["config"]).eval()
    return model, data


def test_semantics_match(golden):
    model, d = golden
    sem = model.semantics(d["latents"], d["labels"])
    torch.testing.assert_close(sem, d["train"]["semantics"], rtol=1e-5, atol=1e-5)


def test_velocities_and_losses_match(golden):
    model, d = golden
    tr = d["train"]
    sem = model.semantics(d["latents"], d["labels"])
    start = 0
    for k, side in enumerate(model.config.scales):
        v = model.velocity(tr["x_t"][k], tr["t"][k], sem[:, start:start + side * side])
        # float32 rounding: the vectors were recorded on another CPU, and torch's CPU kernels
        # sum in a different order per instruction set (AVX-512 vs AVX2). On an AMD EPYC one
        # element of 8192 of the cross-attention block's finest scale differs by 1.2e-5.
        torch.testing.assert_close(v, tr["velocity"][k], rtol=1e-5, atol=3e-5)
        start += side * side
    total, per_scale = model.loss(d["latents"], d["labels"], t=tr["t"], noise=tr["noise"])
    torch.testing.assert_close(torch.stack(per_scale), tr["scale_loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total, tr["total_loss"], rtol=1e-5, atol=1e-6)


def test_generated_tokens_match(golden):
    model, d = golden
    s = d["sample"]
    out = model.generate(d["labels"], s["num_steps"], s["cfg"], s["guidance_high"],
                         noise=s["noise_per_scale"])
    torch.testing.assert_close(out, s["tokens"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["S", "L", "H"])
def test_presets_have_the_published_parameters_and_keys(name):
    manifest = json.loads((GOLDEN / "reference_state_dict_manifest.json").read_text())[name]
    with torch.device("meta"):
        model = FlowAR.from_preset(name)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(model) == manifest["parameters"]
    assert count(model.ar) == manifest["ar_parameters"]
    assert count(model.flow) == manifest["flow_parameters"]
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {rename(k): tuple(v) for k, v in manifest["keys"].items()
              if k != "mask" and not k.endswith("rope.freqs")}
    assert mapped == ours  # every published tensor has exactly one home, with its shape


def test_preset_b_follows_table_8():
    with torch.device("meta"):
        model = FlowAR.from_preset("B")
    cfg = model.config
    assert (cfg.ar_depth, cfg.ar_width, cfg.flow_depth, cfg.flow_width) == (16, 768, 6, 1024)
    assert cfg.injection == "spatial_adaln"  # the paper's block; L and H use the published one
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 300e6) / 300e6 < 0.03  # the paper's "300M"
    # The only size Table 8 leaves open is the MLP: B's AR GEGLU is 3 x 768 wide (S: 2048), and
    # S's width would leave B more than 3% short of 300M.
    assert all(b.mlp.fc2.in_features == 3 * 768 for b in model.ar.blocks)
    with torch.device("meta"):
        narrow = FlowAR.from_preset("B", ar_mlp_ratio=4.0)
    assert sum(p.numel() for p in narrow.parameters()) < 0.97 * 300e6


@pytest.fixture(scope="module")
def v1():
    return torch.load(GOLDEN / FILES[0], weights_only=True)


def test_published_loader_names_missing_and_unexpected_keys(v1):
    sd = dict(v1["state_dict"])
    sd.pop("flownet.final_layer.linear.weight")
    sd["encoder_blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(ConfigError) as err:
        load_published(sd, v1["config"])
    assert "flow.final_layer.linear.weight" in str(err.value)
    assert "ar.first_half.0.attn.extra" in str(err.value)


def test_published_loader_refuses_wrong_shapes_and_wrong_scales(v1):
    sd = dict(v1["state_dict"])
    sd["z_proj.weight"] = torch.zeros(64, 8)
    with pytest.raises(ConfigError, match="ar.input_proj.weight"):
        load_published(sd, v1["config"])
    cfg = json.loads(v1["config"])
    cfg["scale"] = [1, 4, 8, 16]  # the checkpoint's mask and tables were made for 5 scales
    with pytest.raises(ConfigError, match="mask"):
        load_published(v1["state_dict"], cfg)
    cfg = json.loads(v1["config"])
    cfg["mystery"] = 1
    with pytest.raises(ConfigError, match="mystery"):
        load_published(v1["state_dict"], cfg)


def test_prepared_gpu_check_runs_every_section_on_cpu(tmp_path):
    """benchmarks/gpu_check.py is what a session with a lent GPU runs: it must work before then."""
    import importlib.util
    import re

    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "report.md"
    text = gpu_check.main(["--device", "cpu", "--small", "--no-compile", "--golden", str(GOLDEN),
                           "--out", str(out)])
    assert out.read_text() == text and "Traceback" not in text, text
    golden = re.findall(r"\| reference_v\d\S* \| (\S+) \| (\S+) \| (\S+) \|", text)
    assert len(golden) == 2 and all(float(v) < 1e-4 for row in golden for v in row), golden
    assert "| bf16 |" in text and "KV cache" in text and "grad checkpointing" in text
    assert "skipped: give --ref" in text  # the published code is the user's checkout, not here
    assert re.search(r"tiny, batch 2, bf16 \+ AdamW: [\d.]+ TFLOP per step, [\d.]+ s/step", text), text
