"""STN: identity start, resampling against torch references, similarity constraint, cheap localisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hemorrhage_core.models.stn import LOC_SIZE, SpatialTransformer, identity_theta, invert_theta, resample


@pytest.mark.parametrize("mode", ["similarity", "affine", "none"])
def test_identity_at_init_shrinking_equals_antialiased_resize(mode):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 96, 96)
    stn = SpatialTransformer(mode, 40)
    aligned, theta = stn(x)
    assert torch.equal(theta, identity_theta(2))
    reference = F.interpolate(x, size=(40, 40), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(aligned, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["similarity", "affine", "none"])
def test_identity_enlarging_equals_affine_grid_reference(mode):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 24, 24)
    aligned, _ = SpatialTransformer(mode, 50)(x)
    grid = F.affine_grid(identity_theta(2), [2, 3, 50, 50], align_corners=False)
    reference = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(aligned, reference, atol=1e-6, rtol=0)


def test_identity_same_size_returns_input():
    x = torch.rand(1, 3, 32, 32)
    aligned, _ = SpatialTransformer("similarity", 32)(x)
    torch.testing.assert_close(aligned, x, atol=1e-5, rtol=0)


def test_similarity_theta_is_rotation_times_isotropic_scale():
    torch.manual_seed(2)
    stn = SpatialTransformer("similarity", 32)
    with torch.no_grad():  # move away from the identity start
        for p in stn.regressor.parameters():
            p.normal_(0, 0.5)
    theta = stn.theta(torch.rand(4, 3, 64, 64))
    a = theta[:, :, :2]
    scale_sq = torch.linalg.det(a)
    assert bool((scale_sq > 0).all())  # never mirrored or folded
    eye = torch.eye(2).expand(4, 2, 2)
    torch.testing.assert_close(a.transpose(1, 2) @ a, scale_sq.view(4, 1, 1) * eye, atol=1e-5, rtol=1e-5)


def test_affine_has_six_free_parameters_and_theta_gets_gradients():
    torch.manual_seed(3)
    stn = SpatialTransformer("affine", 32)
    x = torch.rand(2, 3, 48, 48)
    aligned, theta = stn(x)
    aligned.mean().backward()
    last = stn.regressor[-1]
    assert last.bias.shape == (6,)
    assert last.weight.grad is not None and last.bias.grad is not None and bool(last.bias.grad.abs().sum() > 0)


def test_invert_theta_composes_to_identity():
    theta = torch.tensor([[[0.8, -0.3, 0.2], [0.3, 0.8, -0.1]]])
    inv = invert_theta(theta)
    full = torch.cat([theta, torch.tensor([[[0.0, 0.0, 1.0]]])], dim=1)
    full_inv = torch.cat([inv, torch.tensor([[[0.0, 0.0, 1.0]]])], dim=1)
    torch.testing.assert_close(full @ full_inv, torch.eye(3).unsqueeze(0), atol=1e-6, rtol=0)


def test_outside_the_image_reads_zero():
    x = torch.rand(1, 3, 16, 16) + 0.5
    shifted_out = torch.tensor([[[1.0, 0.0, 3.0], [0.0, 1.0, 0.0]]])  # sample 3 half-widths to the right
    assert float(resample(x, shifted_out, 16).abs().max()) == 0.0


def test_localisation_net_sees_a_small_copy_at_any_input_size():
    stn = SpatialTransformer("similarity", 32)
    seen = []
    handle = stn.localisation[0].register_forward_hook(lambda m, inp, out: seen.append(tuple(inp[0].shape)))
    try:
        stn(torch.rand(1, 3, 512, 512))
    finally:
        handle.remove()
    assert seen == [(1, 3, LOC_SIZE, LOC_SIZE)]


def test_unknown_mode_refused():
    with pytest.raises(ValueError, match="similarity"):
        SpatialTransformer("perspective", 32)
