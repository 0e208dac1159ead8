"""Every ablation switch of the paper (Tables 3-6) and the knobs the published code hides."""

import pytest
import torch

from flowar import FlowAR, SamplerConfig
from flowar.config import INJECTIONS, ConfigError, preset_config
from flowar.pyramid import image_scale_targets
from pipelines.train.parallelize import apply_activation_checkpointing

BASE = dict(latent_channels=4, scales=(1, 2, 4), num_classes=10)

SWITCHES = [dict(injection=i) for i in INJECTIONS] + [
    dict(head="per_token", injection=i) for i in ("spatial_adaln", "adaln", "addition", "channel_concat")
] + [
    dict(objective="diffusion"), dict(scale_input="upsample2x"), dict(init="zero"),
    dict(time_sampling="logit_normal"), dict(loss_weighting="equal"),
    dict(attn_dropout=0.2, proj_dropout=0.2, label_drop=0.3), dict(grad_checkpointing=True),
    dict(scale_construction="image"),
]


def build(**kw) -> FlowAR:
    torch.manual_seed(0)
    checkpointed = kw.pop("grad_checkpointing", False)  # a training option, not the model's config
    model = FlowAR.from_preset("tiny", **{**BASE, **kw})
    if checkpointed:
        apply_activation_checkpointing(model)
    return model


def batch(model, n=3):
    g = torch.Generator().manual_seed(0)
    c, s = model.config.latent_channels, model.config.latent_size
    return torch.randn(n, c, s, s, generator=g), torch.tensor([0, 4, 9][:n])


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_every_switch_trains_generates_and_round_trips(switch, tmp_path):
    model = build(**switch).train()
    x, y = batch(model)
    extra = {}
    if model.config.scale_construction == "image":
        from diffusers import AutoencoderKL  # a real (randomly initialised) VAE with stride 2
        vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                            norm_num_groups=4, layers_per_block=1).eval()
        images = torch.rand(3, 3, 8, 8) * 2 - 1
        with torch.no_grad():
            encode = lambda im: vae.encode(im).latent_dist.mean
            extra["scale_targets"] = image_scale_targets(images, model.config.scales, 2, encode)
        x = extra["scale_targets"][-1]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    total, per_scale = model.loss(x, y, **extra)
    total.backward()
    opt.step()
    assert torch.isfinite(total) and len(per_scale) == 3
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model.eval()
    out = model.generate(y, sampler=SamplerConfig(num_steps=4, cfg=2.0, time_grid="uniform"))
    assert out.shape == x.shape and torch.isfinite(out).all()
    loaded = FlowAR.from_pretrained(model.save_pretrained(tmp_path / "m")).eval()
    assert loaded.config == model.config
    noise = [torch.randn(3, s * s, 4) for s in model.config.scales]
    torch.testing.assert_close(loaded.generate(y, 4, 1.0, noise=noise, sampler=SamplerConfig(time_grid="uniform")),
                               model.generate(y, 4, 1.0, noise=noise, sampler=SamplerConfig(time_grid="uniform")))


def flow_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, d = model.config.latent_channels, model.config.ar_width
    return torch.randn(2, 16, c, generator=g), torch.tensor([0.3, 0.7]), torch.randn(2, 16, d, generator=g)


PERM = torch.randperm(16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("injection,invariant", [("adaln", True), ("spatial_adaln", False),
                                                 ("cross_attention_adaln", False)])
def test_permuting_semantics_across_positions(injection, invariant):
    """adaln sees only the spatial average of the semantics; the spatial variants see positions."""
    model = build(injection=injection).eval()
    x, t, s = flow_inputs(model)
    same = torch.allclose(model.velocity(x, t, s), model.velocity(x, t, s[:, PERM]), atol=1e-5)
    assert same == invariant


@pytest.mark.parametrize("injection", ["spatial_adaln", "adaln", "addition", "channel_concat"])
def test_per_token_head_sees_one_token(injection):
    model = build(head="per_token", injection=injection).eval()
    x, t, s = flow_inputs(model)
    x2 = x.clone()
    x2[:, 5] += 1.0
    diff = (model.velocity(x2, t, s) - model.velocity(x, t, s)).abs().sum(-1)
    assert diff[:, 5].min() > 0 and diff[:, [i for i in range(16) if i != 5]].max() == 0


@pytest.mark.parametrize("injection", ["addition", "channel_concat"])
def test_input_level_injections_treat_semantics_like_input(injection):
    """With tied projections, addition and channel concatenation are symmetric in (x_t, semantics):
    the semantics enter only through the input embedding."""
    model = build(injection=injection, ar_width=4, ar_heads=1).eval()
    f = model.flow
    with torch.no_grad():
        w = torch.randn(f.input_proj.out_features, 4)
        if injection == "addition":
            f.input_proj.weight.copy_(w)
            f.semantics_proj.weight.copy_(w)
            f.semantics_proj.bias.zero_()
        else:
            f.input_proj.weight.copy_(torch.cat([w, w], dim=1))
    x, t, _ = flow_inputs(model)
    s = torch.randn_like(x)
    torch.testing.assert_close(model.velocity(x, t, s), model.velocity(s, t, x))
    # spatial-adaLN with the same tying is not symmetric: its semantics modulate every block
    other = build(injection="spatial_adaln", ar_width=4, ar_heads=1).eval()
    assert not torch.allclose(other.velocity(x, t, s), other.velocity(s, t, x))


@pytest.mark.parametrize("injection,through_attention_only", [
    ("sequence_concat", True), ("cross_attention", True),
    ("spatial_adaln", False), ("cross_attention_adaln", False)])
def test_attention_borne_injections(injection, through_attention_only):
    """sequence_concat and cross_attention reach the tokens only through attention: silence the
    attention outputs and the semantics no longer matter."""
    model = build(injection=injection).eval()
    with torch.no_grad():
        for blk in model.flow.blocks:
            for proj in [blk.attn.proj] + ([blk.cross_attn.proj] if hasattr(blk, "cross_attn") else []):
                proj.weight.zero_()
                proj.bias.zero_()
    x, t, s = flow_inputs(model)
    unchanged = torch.allclose(model.velocity(x, t, s), model.velocity(x, t, torch.randn_like(s)))
    assert unchanged == through_attention_only


def test_zero_init_makes_every_flow_block_the_identity():
    model = build(init="zero")
    x, t, s = flow_inputs(model)
    assert torch.count_nonzero(model.velocity(x, t, s)) == 0
    published = build()
    assert torch.count_nonzero(published.velocity(x, t, s)) > 0


@pytest.mark.parametrize("solver", ["euler", "heun", "sde"])
@pytest.mark.parametrize("grid", ["published", "uniform"])
def test_samplers_and_grids(solver, grid):
    model = build().eval()
    y = torch.tensor([1, 2])
    out = model.generate(y, sampler=SamplerConfig(num_steps=6, cfg=2.0, solver=solver, time_grid=grid,
                                                  cfg_schedule="constant", guidance_high=1.0))
    assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()


def test_cfg_ramp_and_interval_change_samples():
    model = build().eval()
    y = torch.tensor([1, 2])
    noise = [torch.randn(2, s * s, 4) for s in model.config.scales]
    run = lambda **kw: model.generate(y, noise=noise, sampler=SamplerConfig(num_steps=6, cfg=3.0, **kw))
    assert not torch.allclose(run(cfg_schedule="linear"), run(cfg_schedule="constant"))
    assert not torch.allclose(run(guidance_high=1.0), run(guidance_high=0.5))


@pytest.mark.parametrize("injection", ["cross_attention", "cross_attention_adaln", "sequence_concat"])
def test_invalid_combinations_name_both_values(injection):
    with pytest.raises(ConfigError) as err:
        preset_config("tiny", head="per_token", injection=injection)
    assert "per_token" in str(err.value) and injection in str(err.value)


def test_diffusion_objective_refuses_ode_solvers():
    model = build(objective="diffusion").eval()
    with pytest.raises(ConfigError, match="heun"):
        model.generate(torch.tensor([1]), sampler=SamplerConfig(solver="heun"))


def test_image_scale_construction_requires_its_maps():
    model = build(scale_construction="image")
    x, y = batch(model)
    with pytest.raises(ConfigError, match="scale_targets"):
        model.loss(x, y)


def test_time_sampling_distributions_differ():
    from flowar.objective import sample_time
    uni = sample_time(20000, preset_config("tiny"), "cpu")
    logit = sample_time(20000, preset_config("tiny", time_sampling="logit_normal"), "cpu")
    # logit-normal piles up around 0.5; uniform has a flat histogram
    mid = lambda t: ((t > 0.4) & (t < 0.6)).float().mean().item()
    assert abs(mid(uni) - 0.2) < 0.02 and mid(logit) > 0.3
