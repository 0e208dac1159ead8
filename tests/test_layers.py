"""The faster layers compute what the published formulation computes: dropout with the same p and
placement, the GEGLU MLP on padded matmuls, RoPE as a complex product."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import SwiGLU
from torch import nn

from flowar.layers import GEGLU, Rope2D, apply_rope, attention, dropout, keep_mask


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    n = 1 << 22
    keep = keep_mask(torch.empty(n), p).float()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 6 * sigma
    # The two 32-bit halves of each 64-bit word, and neighbouring words, are independent.
    for a, b in ((keep[0::2], keep[1::2]), (keep[:-2], keep[2:])):
        both = (a * b).mean().item()
        assert abs(both - (1 - p) ** 2) < 6 * (2 * sigma)


def test_keep_mask_is_reproducible_under_the_seed_and_fits_odd_shapes():
    x = torch.empty(3, 5, 7)
    torch.manual_seed(1)
    a = keep_mask(x, 0.3)
    torch.manual_seed(1)
    b = keep_mask(x, 0.3)
    assert a.shape == x.shape and a.dtype == torch.bool and torch.equal(a, b)
    assert not torch.equal(a, keep_mask(x, 0.3))


def test_dropout_scales_kept_values_and_routes_gradients_through_them_only():
    torch.manual_seed(0)
    x = torch.randn(64, 300, requires_grad=True)
    out = dropout(x, 0.25, training=True)
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert abs(kept.float().mean().item() - 0.75) < 0.02
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75)
    assert dropout(x, 0.25, training=False) is x and dropout(x, 0.0, training=True) is x


def test_attention_with_dropout_is_unbiased_and_respects_the_mask():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    draws = torch.stack([attention(q, k, v, mask, 0.2) for _ in range(4000)])
    torch.testing.assert_close(draws.mean(0), exact, atol=0.05, rtol=0)
    # The first query sees only the first key: each head gets v[0] / 0.8 or nothing.
    first, scaled = draws[:, 0, :, 0], v[0, :, 0] / 0.8  # (draws, heads, dim), (heads, dim)
    as_scaled = torch.isclose(first, scaled.expand_as(first)).all(-1)
    dropped = (first == 0).all(-1)
    assert (as_scaled | dropped).all() and 0.1 < dropped.float().mean() < 0.3
    assert torch.equal(attention(q, k, v, mask, 0.0), exact)


@pytest.mark.parametrize("hidden,rows", [(682, 2048), (682, 36), (688, 2048), (5, 4096)])
def test_geglu_equals_timm_swiglu_with_a_gelu_gate(hidden, rows):
    torch.manual_seed(0)
    ours = GEGLU(32, hidden)
    timm = SwiGLU(in_features=32, hidden_features=hidden, act_layer=nn.GELU)
    timm.load_state_dict(ours.state_dict())  # the same parameter names and shapes
    x = torch.randn(4, rows // 4, 32)
    padded = ours.weights(rows)[0].shape[0]
    assert padded == (hidden + (-hidden % 16) if rows >= 2048 else hidden)
    a, b = ours(x), timm(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    a.square().sum().backward()
    b.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), timm.parameters()):
        # sums over thousands of rows, in another order: compared as a whole
        assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm(), name


def test_rope_as_a_complex_product_equals_the_published_rotate_half_form():
    torch.manual_seed(0)
    rope = Rope2D(head_dim=16, latent_size=16)
    rotation = rope.tables([1, 2, 4], torch.device("cpu"))
    x = torch.randn(2, 3, 21, 16)
    # published: angles repeated per interleaved pair, x * cos + rotate_half(x) * sin
    angle = rotation.angle().repeat_interleave(2, dim=-1)
    pairs = rearrange(x, "... (d r) -> ... d r", r=2)
    rotated = rearrange(torch.stack((-pairs[..., 1], pairs[..., 0]), -1), "... d r -> ... (d r)")
    expected = x * angle.cos() + rotated * angle.sin()
    torch.testing.assert_close(apply_rope(x, rotation), expected, rtol=1e-5, atol=1e-6)
    # a token at the same spot of the finest grid turns the same at every scale
    torch.testing.assert_close(rotation[0], rope.table(16, torch.device("cpu"))[0])


@pytest.mark.parametrize("injection", ["spatial_adaln", "cross_attention_adaln", "cross_attention",
                                       "channel_concat", "sequence_concat"])
def test_a_scale_condition_computed_once_gives_the_same_velocity(injection):
    from flowar import FlowAR
    torch.manual_seed(0)
    flow = FlowAR.from_preset("tiny", injection=injection).eval().flow
    sem = torch.randn(4, 16, flow.cfg.ar_width)
    x, t = torch.randn(4, 16, flow.cfg.latent_channels), torch.rand(4)
    condition = flow.condition(sem)
    assert len(condition.keys_values) == (len(flow.blocks) if "cross" in injection else 0)
    torch.testing.assert_close(flow(x, t, condition), flow(x, t, sem), rtol=0, atol=0)
    torch.testing.assert_close(flow(x[:2], t[:2], condition.head(2)), flow(x[:2], t[:2], sem[:2]),
                               rtol=1e-6, atol=1e-6)


def test_geglu_keeps_padded_weights_without_autograd_until_the_weights_change():
    torch.manual_seed(0)
    mlp = GEGLU(8, 10)
    x = torch.randn(2048, 8)
    with torch.no_grad():
        first = mlp(x)
        cached = mlp.weights(2048)
        assert mlp.weights(2048)[0] is cached[0]
        mlp.fc1_g.weight.mul_(2)  # an optimizer step, a load_state_dict
        assert mlp.weights(2048)[0] is not cached[0]
        changed = mlp(x)
    assert not torch.allclose(first, changed)
    timm = SwiGLU(in_features=8, hidden_features=10, act_layer=nn.GELU)
    timm.load_state_dict(mlp.state_dict())
    torch.testing.assert_close(changed, timm(x).detach(), rtol=1e-5, atol=1e-6)
