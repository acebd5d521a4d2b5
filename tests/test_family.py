"""The whitening family on one pipeline: CW-RGP, the power spectral transformation, W-MSE, and the studies."""

import json
import math

import pytest
import torch

import intl
import pretrain


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """ROOT/class_x/*.png: 64 generated 8 x 8 images in 2 classes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("family") / "images"
    generator = torch.Generator().manual_seed(0)
    for i in range(64):
        (root / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (8, 8, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"class_{i % 2}" / f"{i}.png")
    return root


def small(images, *args):
    """A run's flags on the generated images, at a budget of seconds."""
    return ["--dataset", str(images), "--arch", "resnet18", "--projector", "64-64-64", "--num_workers", "0",
            "--knn_every", "0", "--log_every", "1", *map(str, args)]


def reference_cw_rgp(h, groups, perm, axis, eps=0.0):
    """CW-RGP's whitening in float64, written from the definition with explicit loops; eps: (1 - eps) S + eps I."""
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
        cov = (1 - eps) * cov + eps * torch.eye(len(cov), dtype=torch.float64)
        l, u = torch.linalg.eigh(cov)
        w = u @ torch.diag(1 / l.sqrt()) @ u.t()
        out[:, channels] = w @ xg if axis == 0 else xg @ w
    return out


@pytest.mark.parametrize("axis, batch, dim, groups", [(0, 6, 32, 1), (0, 6, 32, 2), (0, 5, 48, 4),
                                                      (1, 20, 12, 1), (1, 20, 12, 3), (1, 30, 16, 2)])
def test_cw_rgp_whiten_equals_float64_definition_with_a_fixed_permutation(axis, batch, dim, groups):
    h = torch.randn(batch, dim, dtype=torch.float64)
    perm = torch.randperm(dim)
    torch.testing.assert_close(intl.GroupWhitening(groups, axis=axis).whiten(h, perm), reference_cw_rgp(h, groups, perm, axis))


@pytest.mark.parametrize("axis, batch, dim", [(0, 4, 24), (1, 16, 6)])
def test_cw_rgp_whiten_passes_gradcheck(axis, batch, dim):
    h = torch.randn(batch, dim, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(dim)
    assert torch.autograd.gradcheck(lambda x: intl.GroupWhitening(2, axis=axis).whiten(x, perm), (h,))


def test_cw_rgp_whiten_output_has_identity_covariance_in_every_group():
    h = torch.randn(8, 64, dtype=torch.float64)
    perm = torch.randperm(64)
    out = intl.GroupWhitening(4, axis=0).whiten(h, perm)
    for channels in perm.chunk(4):
        block = out[:, channels]
        torch.testing.assert_close(block @ block.t() / 15, torch.eye(8, dtype=torch.float64))


def test_power_one_half_is_zca_whitening():
    z = torch.randn(40, 8, dtype=torch.float64)
    x = z - z.mean(0)
    l, u = torch.linalg.eigh(x.t() @ x / 39)
    zca = x @ (u @ torch.diag(l ** -0.5) @ u.t())
    torch.testing.assert_close(intl.PowerTransform(0.5, axis=1)(z), zca)


def test_cholesky_whitening_gives_identity_covariance_and_equals_inverse_cholesky_factor():
    h = torch.randn(50, 10, dtype=torch.float64)
    out = intl.CholeskyWhitening()(h)
    x = h - h.mean(0)
    torch.testing.assert_close(out.t() @ out / 49, torch.eye(10, dtype=torch.float64))
    lower = torch.linalg.cholesky(x.t() @ x / 49)
    torch.testing.assert_close(out, (torch.linalg.inv(lower) @ x.t()).t())


@pytest.mark.parametrize("axis, batch, dim", [(0, 6, 8), (1, 5, 12)])
def test_w_eps_shrinks_the_covariance_towards_the_identity_as_cw_rgp_and_w_mse_define_it(axis, batch, dim):
    """CW-RGP and W-MSE whiten (1 - eps) S + eps I: eps 1 leaves the centred input unchanged."""
    h, perm = torch.randn(batch, dim, dtype=torch.float64), torch.randperm(dim)
    for eps in (0.3, 1.0):
        torch.testing.assert_close(intl.GroupWhitening(2, eps=eps, axis=axis).whiten(h, perm),
                                   reference_cw_rgp(h, 2, perm, axis, eps))
    x = h - h.mean(0)
    lower = torch.linalg.cholesky(0.7 * x.t() @ x / (batch - 1) + 0.3 * torch.eye(dim, dtype=torch.float64))
    torch.testing.assert_close(intl.CholeskyWhitening(eps=0.3)(h), (torch.linalg.inv(lower) @ x.t()).t())
    torch.testing.assert_close(intl.CholeskyWhitening(eps=1.0)(h), x)


def test_sub_batch_methods_whiten_each_sub_batch_and_average_all_view_pairs():
    projector = torch.nn.Identity()
    model = intl.SubBatchWhitening(torch.nn.Flatten(), projector, intl.CholeskyWhitening(), w_size=8)
    z = [torch.randn(16, 4, dtype=torch.float64) for _ in range(3)]
    out = model.objective(z, step=5)
    rows = torch.randperm(16, generator=torch.Generator().manual_seed(5)).split(8)
    expected = []
    for r in rows:
        w = [intl.CholeskyWhitening()(v[r]) for v in z]
        expected += [intl.alignment_loss(w[i], w[j]) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert out["loss"].item() == pytest.approx(sum(expected).item() / len(expected))


@pytest.mark.parametrize("call, message", [
    (lambda: intl.GroupWhitening(4)(torch.randn(64, 128)), "singular by construction"),
    (lambda: intl.GroupWhitening(4)(torch.randn(8, 30)), "must divide the embedding dim"),
    (lambda: intl.CholeskyWhitening()(torch.randn(16, 32)), "singular by construction"),
    (lambda: intl.SubBatchWhitening(torch.nn.Flatten(), torch.nn.Identity(), intl.CholeskyWhitening(), 5).objective(
        [torch.randn(16, 2)] * 2), "not a multiple of --w_size"),
])
def test_singular_or_impossible_whitening_settings_say_what_to_change(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("method_flags", [
    ["--method", "st", "--power", "0.5", "--projector", "256-256-256", "--w_eps", "1e-3"],
    ["--method", "cw-rgp", "--projector", "64-256", "--groups", "2", "--w_size", "8", "--num_views", "4",
     "--w_eps", "1e-3"],  # 2 sub-batches of 8
    ["--method", "wmse", "--projector", "64-16", "--w_size", "32", "--batch_size", "64"],  # 2 sub-batches of 32 > 16
    ["--method", "intl-m", "--small_crops", "8", "8"],
])
@pytest.mark.slow
def test_each_method_trains_end_to_end_through_pretrain(images, tmp_path, method_flags):
    # 3 steps, stopped before the end of the run (4 epochs: 4 steps of 64 images to 16 of 16).
    pretrain.main(small(images, "--output_dir", tmp_path, "--image_size", 16, "--batch_size", 16, "--epochs", 4,
                        *method_flags, "--stop_after_steps", 3))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


@pytest.mark.slow
def test_power_study_writes_table_and_figures_and_records_failed_runs(images, tmp_path, capsys, monkeypatch):
    # The study in this process; each of its runs is a process of its own (one thread each, as conftest's).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pretrain.main(small(images, "--study", "power", "--study_values", "0", "0.5", "--image_size", 8, "--batch_size", 16,
                        "--epochs", 1, "--projector", "8-8-8", "--w_eps", "0", "--output_dir", tmp_path))
    rows = json.loads((tmp_path / "power_study.json").read_text())
    assert [r["power"] for r in rows] == [0, 0.5]
    assert rows[0]["error"] == "" and rows[0]["lg_ioc_z"] is not None
    # B = 16 samples over D = 8 channels: whitening is impossible, and the table says so.
    assert "singular by construction" in rows[1]["error"]
    assert (tmp_path / "power_study.png").stat().st_size > 0
    assert "power study: 2 runs" in capsys.readouterr().out


def test_eigendecomposition_gradients_stay_finite_and_exact_when_eigenvalues_repeat():
    # Two identical samples (two identical crops) on axis 0 make eigenvalues of S + eps I repeat,
    # where autograd through eigh divides by zero.
    z = torch.randn(6, 12, dtype=torch.float64)
    z[1] = z[0]
    z.requires_grad_(True)
    intl.PowerTransform(0.5, axis=0, eps=1e-3)(z).pow(3).sum().backward()
    assert torch.isfinite(z.grad).all()
    assert torch.autograd.gradcheck(lambda x: intl.PowerTransform(0.5, axis=0, eps=1e-3)(x), (z.detach().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda x: intl.PowerTransform(0.0, axis=0, eps=1e-3)(x), (z.detach().requires_grad_(),))


@pytest.mark.parametrize("whiten", [lambda h: intl.GroupWhitening(2).whiten(h, torch.arange(48)),
                                    lambda h: intl.CholeskyWhitening()(h[:, :4])], ids=["cw_rgp", "cholesky"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_family_whitening_computes_in_float32_under_autocast_and_returns_the_callers_dtype(whiten, dtype):
    h = torch.randn(8, 48)
    expected = whiten(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = whiten(h.to(dtype))
    assert out.dtype == dtype
    # Only the input's and the output's rounding to half precision remain.
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)


def test_cw_rgp_whiten_refuses_a_single_sample():
    with pytest.raises(ValueError, match="at least 2 samples"):
        intl.GroupWhitening(2, eps=1e-3)(torch.randn(1, 64))


@pytest.mark.parametrize("normalized", [True, False])
def test_cw_rgp_objective_draws_a_fresh_permutation_per_sub_batch_view_and_repeat(monkeypatch, normalized):
    calls = []
    whiten = intl.GroupWhitening.whiten

    def recording(self, h, perm):
        calls.append((h.detach().clone(), perm.clone()))
        return whiten(self, h, perm)

    monkeypatch.setattr(intl.GroupWhitening, "whiten", recording)
    views, w_iter = 3, 2
    model = intl.SubBatchWhitening(torch.nn.Flatten(), torch.nn.Identity(), intl.GroupWhitening(groups=2), w_size=4,
                                   w_iter=w_iter, normalized=normalized)
    z = [torch.randn(8, 16, dtype=torch.float64) for _ in range(views)]
    loss = model.objective(z, step=3)["loss"]
    assert len(calls) == w_iter * (8 // 4) * views
    assert len({tuple(perm.tolist()) for _, perm in calls}) == len(calls)  # every one fresh
    # The same step draws the same partitions on every process: the loss is reproducible.
    assert model.objective(z, step=3)["loss"].item() == loss.item()
    pair_losses = []
    for first in range(0, len(calls), views):  # the calls of one sub-batch: one per view, in view order
        rows = [row for h in calls[first][0] for row in range(8) if torch.equal(z[0][row], h)]
        assert len(set(rows)) == 4
        whitened = [reference_cw_rgp(h, 2, perm, axis=0) for h, perm in calls[first:first + views]]
        for v, (h, _) in enumerate(calls[first:first + views]):
            assert torch.equal(h, z[v][rows])  # view v's rows of the same sub-batch
        for i in range(views):
            for j in range(i + 1, views):
                a, b = whitened[i], whitened[j]
                pair_losses.append(2 - 2 * torch.nn.functional.cosine_similarity(a, b).mean() if normalized
                                   else (a - b).pow(2).mean())  # the mean over B x D
    assert loss.item() == pytest.approx(sum(pair_losses).item() / len(pair_losses), rel=1e-9)


@pytest.mark.slow
def test_trace_study_trains_each_t_with_and_without_the_trace_loss(images, tmp_path, capsys, monkeypatch):
    # The study in this process; each of its runs is a process of its own (one thread each, as conftest's).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    pretrain.main(small(images, "--study", "trace", "--study_values", "2", "--image_size", 8, "--batch_size", 16,
                        "--epochs", 1, "--projector", "16-16-16", "--output_dir", tmp_path))
    rows = json.loads((tmp_path / "trace_study.json").read_text())
    assert [(r["iters"], r["trace_loss"]) for r in rows] == [(2, True), (2, False)]
    assert all(r["error"] == "" and r["lg_ioc_z"] is not None for r in rows)
    configs = [json.loads((tmp_path / r["run"] / "backbone" / "config.json").read_text()) for r in rows]
    assert [c["recipe"]["beta"] for c in configs] == [pytest.approx(0.01), 0]  # 0.01 (log2 16 - 3): the default
    assert (tmp_path / "trace_study.png").stat().st_size > 0
    assert "trace study: 2 runs" in capsys.readouterr().out
