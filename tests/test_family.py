"""The whitening family on one pipeline: CW-RGP, the power spectral transformation, W-MSE, and the studies."""

import json
import math

import pytest
import torch

import intl
from test_pretrain import SMALL, run


def reference_cw_rgp(h, groups, perm, axis):
    """CW-RGP's whitening in float64, written from the definition with explicit loops."""
    h = h.double()
    batch, dim = h.shape
    if axis == 0:
        x = torch.stack([row - row.mean() for row in h])
    else:
        x = torch.stack([col - col.mean() for col in h.t()]).t()
    out = torch.zeros_like(x)
    width = dim // groups
    for g in range(groups):
        channels = perm[g * width:(g + 1) * width]
        xg = x[:, channels]
        if axis == 0:
            cov = xg @ xg.t() / (width - 1)
        else:
            cov = xg.t() @ xg / (batch - 1)
        l, u = torch.linalg.eigh(cov)
        w = u @ torch.diag(1 / l.sqrt()) @ u.t()
        out[:, channels] = w @ xg if axis == 0 else xg @ w
    return out


@pytest.mark.parametrize("axis, batch, dim, groups", [(0, 6, 32, 1), (0, 6, 32, 2), (0, 5, 48, 4),
                                                      (1, 20, 12, 1), (1, 20, 12, 3), (1, 30, 16, 2)])
def test_cw_rgp_whiten_equals_float64_definition_with_a_fixed_permutation(axis, batch, dim, groups):
    h = torch.randn(batch, dim, dtype=torch.float64)
    perm = torch.randperm(dim)
    torch.testing.assert_close(intl.cw_rgp_whiten(h, groups, perm, axis=axis), reference_cw_rgp(h, groups, perm, axis))


@pytest.mark.parametrize("axis, batch, dim", [(0, 4, 24), (1, 16, 6)])
def test_cw_rgp_whiten_passes_gradcheck(axis, batch, dim):
    h = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(dim)
    assert torch.autograd.gradcheck(lambda x: intl.cw_rgp_whiten(x, 2, perm, axis=axis), (h,))


def test_cw_rgp_whiten_output_has_identity_covariance_in_every_group():
    h = torch.randn(8, 64, dtype=torch.float64)
    perm = torch.randperm(64)
    out = intl.cw_rgp_whiten(h, 4, perm, axis=0)
    for channels in perm.chunk(4):
        block = out[:, channels]
        torch.testing.assert_close(block @ block.t() / 15, torch.eye(8, dtype=torch.float64))


def test_power_one_half_is_zca_whitening():
    z = torch.randn(40, 8, dtype=torch.float64)
    x = z - z.mean(0)
    l, u = torch.linalg.eigh(x.t() @ x / 39)
    zca = x @ (u @ torch.diag(l ** -0.5) @ u.t())
    torch.testing.assert_close(intl.spectral_transform(z, 0.5, axis=1), zca)


def test_cholesky_whitening_gives_identity_covariance_and_equals_inverse_cholesky_factor():
    h = torch.randn(50, 10, dtype=torch.float64)
    out = intl.cholesky_whiten(h)
    x = h - h.mean(0)
    torch.testing.assert_close(out.t() @ out / 49, torch.eye(10, dtype=torch.float64))
    lower = torch.linalg.cholesky(x.t() @ x / 49)
    torch.testing.assert_close(out, (torch.linalg.inv(lower) @ x.t()).t())


def test_sub_batch_methods_whiten_each_sub_batch_and_average_all_view_pairs():
    projector = torch.nn.Identity()
    model = intl.wmse(torch.nn.Flatten(), projector, w_size=8)
    z = [torch.randn(16, 4, dtype=torch.float64) for _ in range(3)]
    out = model.objective(z, step=5)
    rows = torch.randperm(16, generator=torch.Generator().manual_seed(5)).split(8)
    expected = []
    for r in rows:
        w = [intl.cholesky_whiten(v[r]) for v in z]
        expected += [intl.alignment_loss(w[i], w[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert out["loss"].item() == pytest.approx(sum(expected).item() / len(expected))


@pytest.mark.parametrize("call, message", [
    (lambda: intl.cw_rgp_whiten(torch.randn(64, 128), 4), "singular by construction"),
    (lambda: intl.cw_rgp_whiten(torch.randn(8, 30), 4), "must divide the embedding dim"),
    (lambda: intl.cholesky_whiten(torch.randn(16, 32)), "singular by construction"),
    (lambda: intl.wmse(torch.nn.Flatten(), torch.nn.Identity(), w_size=5).objective(
        [torch.randn(16, 2)] * 2), "not a multiple of --w_size"),
])
def test_singular_or_impossible_whitening_settings_say_what_to_change(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("method_flags", [
    ["--method", "st", "--power", "0.5", "--projector", "256-256-256", "--w_eps", "1e-3"],
    ["--method", "cw-rgp", "--projector", "64-256", "--groups", "2", "--w_size", "64", "--num_views", "4",
     "--w_eps", "1e-3"],
    ["--method", "wmse", "--projector", "64-16", "--w_size", "64"],
    ["--method", "intl-m", "--small_crops", "8,8"],
])
def test_each_method_trains_end_to_end_through_pretrain(tmp_path, method_flags):
    run("--output_dir", tmp_path, *SMALL, *method_flags, "--stop_after_steps", "3", "--knn_every", "0")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


def test_power_study_writes_table_and_figures_and_records_failed_runs(tmp_path):
    result = run("--study", "power", "--study_values", "0,0.5", *SMALL, "--projector", "64-64-64",
                 "--output_dir", tmp_path)
    rows = json.loads((tmp_path / "power_study.json").read_text())
    assert [r["power"] for r in rows] == [0, 0.5]
    assert rows[0]["error"] == "" and rows[0]["lg_ioc_z"] is not None
    # B = 128 samples over D = 64 channels: whitening is impossible, and the table says so.
    assert "singular by construction" in rows[1]["error"]
    for name in ("power_study.csv", "power_study.png", "power_study_spectra.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "power study: 2 runs" in result.stdout


def test_eigendecomposition_gradients_stay_finite_and_exact_when_eigenvalues_repeat():
    # Two identical samples (two identical crops) on axis 0 make eigenvalues of S + eps I repeat,
    # where autograd through eigh divides by zero.
    z = torch.randn(6, 12, dtype=torch.float64)
    z[1] = z[0]
    z.requires_grad_(True)
    intl.spectral_transform(z, 0.5, axis=0, eps=1e-3).pow(3).sum().backward()
    assert torch.isfinite(z.grad).all()
    assert torch.autograd.gradcheck(lambda x: intl.spectral_transform(x, 0.5, axis=0, eps=1e-3), (z.detach().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda x: intl.spectral_transform(x, 0.0, axis=0, eps=1e-3), (z.detach().requires_grad_(),))


@pytest.mark.parametrize("axis", [0, 1])
def test_coupled_iternorm_equals_the_papers_form_at_four_iterations(axis):
    z = torch.randn(12, 20, dtype=torch.float64)
    torch.testing.assert_close(intl.iternorm(z, 4, axis, coupled=True), intl.iternorm(z, 4, axis), atol=1e-12, rtol=0)
    z32 = z.float()
    torch.testing.assert_close(intl.iternorm(z32, 4, axis, coupled=True), intl.iternorm(z32, 4, axis), atol=1e-5, rtol=0)
    assert torch.autograd.gradcheck(lambda x: intl.iternorm(x, 3, axis, coupled=True), (z[:5, :7].clone().requires_grad_(),))


def test_coupled_iternorm_stays_finite_and_whitens_where_the_papers_form_diverges():
    z = torch.randn(64, 256)
    reference = intl.iternorm(z.double(), 30, coupled=True)
    papers, coupled = intl.iternorm(z, 30), intl.iternorm(z, 30, coupled=True)
    assert not torch.isfinite(papers).all() or (papers.double() - reference).abs().max() > 1
    assert (coupled.double() - reference).abs().max() < 1e-4
    assert intl.lg_ioc(intl.covariance_spectrum(coupled)) > -1e-3  # whitened: all eigenvalues equal
