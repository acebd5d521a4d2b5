"""Specification of intl.py, checked against independent float64 references.

Every reference below is written from the equations of PAPER_NOTES.md sections 1-5 with explicit
loops / formulas (no intl.py helper, no torch.cov / var / cosine_similarity):

    axis 0: units = rows of Z [B, D] (each sample over its D channels)
    axis 1: units = columns of Z (each channel over the B samples)
    X = units centred over their observations,  S = X X^T / (n_obs - 1)
    IterNorm: S_N = S / tr S, P_0 = I, P_k = (3 P_{k-1} - P_{k-1}^3 S_N) / 2, Z_hat = P_T X / sqrt(tr S)
    ST:       Z_hat = U diag(l^-p) U^T X
    TL = sum_i (var_i - 1)^2,  align = 2 - 2 mean_i cos(a_i, b_i)
    L = sum_{v>=1} [align(Zh_v, Zh_0) + beta (TL(Zh_v) + TL(Zh_0))] / (V - 1),
    beta = 0.01 (log2(B) - 3) (axis 0) or 0.01 (log2(D) - 3) (axis 1)
"""

import copy
import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torchvision

import intl
import pretrain

F64 = torch.float64


# -----------------------------------------------------------------------------
# Independent float64 references (torch ops so that autograd gives reference gradients)


def ref_units(z, axis):
    return z if axis == 0 else z.t()


def ref_centre(u):
    """Centre each row of u over its observations, one row at a time."""
    n = u.shape[1]
    return torch.stack([u[i] - u[i].sum() / n for i in range(u.shape[0])])


def ref_covariance(u):
    """(centred units, S) with S[i, j] = sum_k x_ik x_jk / (n - 1), built entry by entry."""
    x = ref_centre(u)
    m, n = x.shape
    rows = [torch.stack([(x[i] * x[j]).sum() / (n - 1) for j in range(m)]) for i in range(m)]
    return x, torch.stack(rows)


def ref_iternorm(z, iters, axis):
    x, s = ref_covariance(ref_units(z, axis))
    m = s.shape[0]
    trace = sum(s[i, i] for i in range(m))
    s_n = s / trace
    p = torch.eye(m, dtype=z.dtype)
    for _ in range(iters):
        p = 0.5 * (3 * p - p @ p @ p @ s_n)
    out = (p / torch.sqrt(trace)) @ x
    return ref_units(out, axis)


def ref_iternorm_by_polynomial(z, iters, axis):
    """Theorem 1 route, in numpy: P_T = U diag(f_T(l_N)) U^T with the scalar Newton polynomial
    f_0 = 1, f_k = (3 f_{k-1} - f_{k-1}^3 l) / 2 applied to the eigenvalues l_N of S_N."""
    u = ref_units(z, axis).detach().numpy().astype(np.float64)
    x = u - u.mean(axis=1, keepdims=True)
    s = x @ x.T / (x.shape[1] - 1)
    trace = np.trace(s)
    l, vecs = np.linalg.eigh(s / trace)
    f = np.ones_like(l)
    for _ in range(iters):
        f = 0.5 * (3 * f - f ** 3 * l)
    out = vecs @ np.diag(f) @ vecs.T @ x / np.sqrt(trace)
    return torch.from_numpy(out if axis == 0 else out.T)


def ref_spectral_numpy(z, power, axis):
    """Forward reference through scipy's fractional matrix power (Schur-Pade, no eigh)."""
    u = ref_units(z, axis).detach().numpy().astype(np.float64)
    x = u - u.mean(axis=1, keepdims=True)
    s = x @ x.T / (x.shape[1] - 1)
    w = np.real(scipy.linalg.fractional_matrix_power(s, -power))
    out = w @ x
    return torch.from_numpy(out if axis == 0 else out.T)


def ref_spectral_torch(z, power, axis):
    """Differentiable reference: U diag(l^-p) U^T X with the entry-by-entry covariance."""
    x, s = ref_covariance(ref_units(z, axis))
    l, vecs = torch.linalg.eigh(s)
    out = vecs @ torch.diag(l ** (-power)) @ vecs.t() @ x
    return ref_units(out, axis)


def ref_trace_loss(z_hat, axis):
    u = ref_units(z_hat, axis)
    n = u.shape[1]
    total = 0
    for i in range(u.shape[0]):
        mean = u[i].sum() / n
        var = ((u[i] - mean) ** 2).sum() / (n - 1)
        total = total + (var - 1) ** 2
    return total


def ref_alignment(a, b):
    cosines = [(a[i] * b[i]).sum() / torch.sqrt((a[i] ** 2).sum() * (b[i] ** 2).sum()) for i in range(a.shape[0])]
    return 2 - 2 * sum(cosines) / len(cosines)


def ref_beta(batch, dim, axis):
    return 0.01 * (math.log2(batch if axis == 0 else dim) - 3)


def ref_intl_loss(views, iters=4, axis=0, beta=None, trace_on_view0=True):
    if beta is None:
        beta = ref_beta(*views[0].shape, axis)
    z_hat = [ref_iternorm(v, iters, axis) for v in views]
    tl_0 = ref_trace_loss(z_hat[0], axis) if trace_on_view0 else 0
    total = 0
    for zh in z_hat[1:]:
        total = total + ref_alignment(zh, z_hat[0]) + beta * (ref_trace_loss(zh, axis) + tl_0)
    return total / (len(views) - 1)


def output_cov_distance(z_hat, axis):
    """|| cov(Z_hat) - I ||_F with the covariance the transform whitens."""
    _, s = ref_covariance(ref_units(z_hat, axis))
    return (s - torch.eye(s.shape[0], dtype=s.dtype)).norm().item()


def input_grad(fn, z, weights):
    z = z.detach().clone().requires_grad_(True)
    (fn(z) * weights).sum().backward()
    return z.grad


# -----------------------------------------------------------------------------
# 1. Functional forms equal the float64 references, forward and backward

ITERNORM_CASES = [  # (B, D, T, axis)
    (4, 8, 1, 0),
    (8, 16, 4, 0),
    (12, 6, 6, 0),  # B > D: singular B x B covariance, IterNorm still defined
    (12, 5, 4, 1),
    (6, 10, 3, 1),  # D > B - 1: singular D x D covariance
    (24, 8, 8, 1),
]


@pytest.mark.parametrize("B,D,T,axis", ITERNORM_CASES)
def test_iternorm_matches_float64_newton_iteration_on_both_axes(B, D, T, axis):
    z = torch.randn(B, D, dtype=F64) * 3 + 1
    out = intl.IterNorm(iters=T, axis=axis)(z)
    assert out.shape == (B, D) and out.dtype == F64
    torch.testing.assert_close(out, ref_iternorm(z, T, axis), rtol=1e-9, atol=1e-10)
    # Theorem 1: the same result from the scalar polynomial applied to the eigenvalues
    torch.testing.assert_close(out, ref_iternorm_by_polynomial(z, T, axis), rtol=1e-7, atol=1e-8)


def test_iternorm_default_arguments_are_four_iterations_on_axis_0():
    z = torch.randn(8, 16, dtype=F64)
    torch.testing.assert_close(intl.IterNorm()(z), ref_iternorm(z, 4, 0), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("B,D,T,axis", ITERNORM_CASES)
def test_iternorm_gradient_matches_gradient_of_reference(B, D, T, axis):
    z = torch.randn(B, D, dtype=F64)
    g = torch.randn(B, D, dtype=F64)
    got = input_grad(lambda t: intl.IterNorm(iters=T, axis=axis)(t), z, g)
    want = input_grad(lambda t: ref_iternorm(t, T, axis), z, g)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("B,D,T,axis", [(4, 6, 3, 0), (3, 5, 5, 0), (6, 4, 3, 1), (5, 3, 2, 1)])
def test_iternorm_passes_gradcheck(B, D, T, axis):
    z = torch.randn(B, D, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: intl.IterNorm(iters=T, axis=axis)(t), (z,))


SPECTRAL_CASES = [  # (B, D, power, axis); axis 0 needs D - 1 >= B, axis 1 needs B - 1 >= D
    (4, 9, 0.5, 0),
    (6, 16, 0.25, 0),
    (5, 12, 1.0, 0),
    (10, 4, 0.5, 1),
    (16, 6, 0.75, 1),
    (8, 7, 1.25, 1),
]


@pytest.mark.parametrize("B,D,power,axis", SPECTRAL_CASES)
def test_spectral_transform_matches_float64_fractional_matrix_power(B, D, power, axis):
    z = torch.randn(B, D, dtype=F64) * 2 - 0.5
    out = intl.PowerTransform(power=power, axis=axis)(z)
    assert out.shape == (B, D) and out.dtype == F64
    torch.testing.assert_close(out, ref_spectral_numpy(z, power, axis), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("B,D,power,axis", SPECTRAL_CASES)
def test_spectral_transform_gradient_matches_gradient_of_reference(B, D, power, axis):
    z = torch.randn(B, D, dtype=F64)
    g = torch.randn(B, D, dtype=F64)
    got = input_grad(lambda t: intl.PowerTransform(power=power, axis=axis)(t), z, g)
    want = input_grad(lambda t: ref_spectral_torch(t, power, axis), z, g)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("B,D,power,axis", [(3, 6, 0.5, 0), (3, 5, 0.25, 0), (6, 3, 0.5, 1), (7, 4, 1.0, 1)])
def test_spectral_transform_passes_gradcheck(B, D, power, axis):
    z = torch.randn(B, D, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: intl.PowerTransform(power=power, axis=axis)(t), (z,))


def test_spectral_transform_power_zero_only_centres():
    z = torch.randn(6, 4, dtype=F64)
    torch.testing.assert_close(intl.PowerTransform(power=0.0, axis=0)(z), z - z.mean(1, keepdim=True))
    torch.testing.assert_close(intl.PowerTransform(power=0.0, axis=1)(z), z - z.mean(0, keepdim=True))


@pytest.mark.parametrize("B,D,axis", [(8, 5, 0), (5, 8, 0), (8, 5, 1), (5, 8, 1)])
def test_trace_loss_matches_sum_of_squared_variance_gaps(B, D, axis):
    z = torch.randn(B, D, dtype=F64) * 1.7 + 0.3
    got = intl.trace_loss(z, axis=axis)
    assert got.dim() == 0
    torch.testing.assert_close(got, ref_trace_loss(z, axis), rtol=1e-10, atol=1e-12)
    g = torch.tensor(1.0, dtype=F64)
    torch.testing.assert_close(
        input_grad(lambda t: intl.trace_loss(t, axis=axis), z, g),
        input_grad(lambda t: ref_trace_loss(t, axis), z, g),
        rtol=1e-10, atol=1e-12,
    )


@pytest.mark.parametrize("axis", [0, 1])
def test_trace_loss_passes_gradcheck(axis):
    z = torch.randn(4, 5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: intl.trace_loss(t, axis=axis), (z,))


def test_alignment_loss_matches_two_minus_two_mean_cosine():
    a, b = torch.randn(7, 5, dtype=F64), torch.randn(7, 5, dtype=F64)
    torch.testing.assert_close(intl.alignment_loss(a, b), ref_alignment(a, b), rtol=1e-10, atol=1e-12)
    assert abs(intl.alignment_loss(a, 3 * a).item()) < 1e-12  # scale invariant, identical directions
    assert abs(intl.alignment_loss(a, -a).item() - 4) < 1e-12
    g = torch.tensor(1.0, dtype=F64)
    torch.testing.assert_close(
        input_grad(lambda t: intl.alignment_loss(t, b), a, g), input_grad(lambda t: ref_alignment(t, b), a, g)
    )


INTL_LOSS_CASES = [  # (V, B, D, T, axis, beta)
    (2, 8, 16, 4, 0, None),
    (3, 16, 6, 4, 0, None),
    (4, 8, 12, 2, 0, 0.05),
    (2, 12, 16, 4, 1, None),
    (3, 10, 4, 5, 1, 0.1),
]


@pytest.mark.parametrize("V,B,D,T,axis,beta", INTL_LOSS_CASES)
def test_intl_loss_matches_reference_objective_and_gradient(V, B, D, T, axis, beta):
    base = torch.randn(B, D, dtype=F64)
    views = [(base + 0.5 * torch.randn(B, D, dtype=F64)).requires_grad_(True) for _ in range(V)]
    got = intl.intl_loss(views, iters=T, axis=axis, beta=beta)
    assert got.dim() == 0
    ref_views = [v.detach().clone().requires_grad_(True) for v in views]
    want = ref_intl_loss(ref_views, T, axis, beta)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    got.backward()
    want.backward()
    for v, r in zip(views, ref_views):
        torch.testing.assert_close(v.grad, r.grad, rtol=1e-8, atol=1e-10)


def test_intl_loss_default_beta_uses_batch_size_on_axis_0_and_dim_on_axis_1():
    B, D = 32, 8
    views = [torch.randn(B, D, dtype=F64) for _ in range(2)]
    for axis, beta in [(0, 0.01 * (5 - 3)), (1, 0.01 * (3 - 3))]:
        torch.testing.assert_close(intl.intl_loss(views, axis=axis), intl.intl_loss(views, axis=axis, beta=beta))
        torch.testing.assert_close(intl.intl_loss(views, axis=axis), ref_intl_loss(views, 4, axis, beta))


@pytest.mark.parametrize("axis,beta", [(0, None), (1, None), (0, 0.3)])
def test_intl_loss_passes_gradcheck(axis, beta):
    B, D = (4, 6) if axis == 0 else (6, 4)
    views = tuple(torch.randn(B, D, dtype=F64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda *v: intl.intl_loss(list(v), iters=3, axis=axis, beta=beta), views)


def test_spectrum_diagnostics_match_numpy_eigenvalues():
    for B, D, axis in [(6, 10, 0), (10, 6, 0), (10, 6, 1), (6, 10, 1)]:
        z = torch.randn(B, D, dtype=torch.float32)
        eigs = pretrain.covariance_spectrum(z, axis=axis)
        u = ref_units(z.double(), axis).numpy()
        x = u - u.mean(1, keepdims=True)
        want = np.sort(np.linalg.eigvalsh(x @ x.T / (x.shape[1] - 1)))[::-1][: min(x.shape[0], x.shape[1] - 1)]
        assert eigs.dtype == F64 and eigs.shape == (len(want),)
        assert torch.all(eigs[:-1] >= eigs[1:])
        np.testing.assert_allclose(eigs.numpy(), want, rtol=1e-8, atol=1e-10)
        assert eigs[-1] > 1e-6  # the structurally-zero eigenvalues are excluded
    assert pretrain.lg_ioc(torch.tensor([10.0, 5.0, 1.0], dtype=F64)) == pytest.approx(-1.0)
    # Rank-deficient: -inf, not a number made up from a clamp.
    assert pretrain.lg_ioc(torch.tensor([10.0, 5.0, 1e-12], dtype=F64)) == -math.inf
    assert pretrain.lg_ioc(torch.tensor([10.0, 5.0, 0.0], dtype=F64)) == -math.inf
    assert pretrain.lg_ioc(torch.zeros(3, dtype=F64)) == -math.inf
    assert pretrain.effective_rank(torch.ones(7, dtype=F64)) == pytest.approx(7.0)
    assert pretrain.effective_rank(torch.tensor([3.0, 0.0, 0.0], dtype=F64)) == pytest.approx(1.0)
    p = np.array([4.0, 2.0, 1.0, 1.0]) / 8
    assert pretrain.effective_rank(torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=F64)) == pytest.approx(
        math.exp(-sum(q * math.log(q) for q in p))
    )


# -----------------------------------------------------------------------------
# 2. Whitening properties


@pytest.mark.parametrize("B,D,axis", [(8, 32, 0), (16, 20, 0), (32, 8, 1), (12, 10, 1)])
def test_spectral_transform_whitening_gives_identity_output_covariance(B, D, axis):
    z = torch.randn(B, D, dtype=F64) @ torch.randn(D, D, dtype=F64)  # correlated input
    out = intl.PowerTransform(power=0.5, axis=axis)(z)
    assert output_cov_distance(out, axis) < 1e-9


@pytest.mark.parametrize("power", [0.25, 0.75, 1.0])
def test_spectral_transform_maps_eigenvalue_l_to_l_power_one_minus_two_p(power):
    z = torch.randn(6, 20, dtype=F64)
    _, s_in = ref_covariance(z)
    _, s_out = ref_covariance(intl.PowerTransform(power=power, axis=0)(z))
    l_in = np.sort(np.linalg.eigvalsh(s_in.numpy()))
    l_out = np.sort(np.linalg.eigvalsh(s_out.numpy()))
    want = np.sort(l_in ** (1 - 2 * power))
    np.testing.assert_allclose(l_out, want, rtol=1e-8)


@pytest.mark.parametrize("B,D,axis", [(8, 64, 0), (16, 64, 0), (64, 8, 1)])
def test_iternorm_output_covariance_approaches_identity_as_iterations_grow(B, D, axis):
    # Well-conditioned input (cond(S) ~ 3-7). Measured in float64 with seed 0:
    #   B=16, D=64, axis 0: T=1 3.5, T=4 1.3, T=6 0.15, T=8 7.7e-5, T=10 1.1e-13, then the error
    #   grows again (T=15 7e-11, T=20 6e-8, T=25 5e-5, T=30 4e-2): the paper's Newton
    #   iteration amplifies rounding errors once converged, which is the paper's instability for
    #   large T. In float32 the same input gives 7e-5 at T=8, 2e-2 at T=16, 6.8 at T=20, inf at
    #   T=30 and NaN at T=40.
    z = torch.randn(B, D, dtype=F64)
    dist = [output_cov_distance(intl.IterNorm(iters=T, axis=axis)(z), axis) for T in range(1, 11)]
    for before, after in zip(dist, dist[1:]):
        assert after < before or after < 1e-11, dist
    assert dist[0] > 1.0  # one step is far from white: finite T does not whiten
    assert dist[-1] < 1e-8, dist


# -----------------------------------------------------------------------------
# 3. Mixed precision: the modules compute in float32 and return the input dtype


def _module_cases():
    return [
        (intl.IterNorm(iters=4, axis=0), lambda z: intl.IterNorm(4, 0)(z), (16, 64)),
        (intl.IterNorm(iters=6, axis=1), lambda z: intl.IterNorm(6, 1)(z), (64, 16)),
        (intl.PowerTransform(power=0.5, axis=0), lambda z: intl.PowerTransform(0.5, 0)(z), (16, 64)),
        (intl.PowerTransform(power=0.75, axis=1), lambda z: intl.PowerTransform(0.75, 1)(z), (64, 16)),
    ]


@pytest.mark.parametrize("case", range(4))
def test_transform_modules_survive_saving_the_whole_module_and_compute_the_same(case):
    import io

    module, _, shape = _module_cases()[case]
    buffer = io.BytesIO()
    torch.save(module, buffer)  # a whole model with its transform, as some users save one
    buffer.seek(0)
    z = torch.randn(*shape)
    assert torch.equal(torch.load(buffer, weights_only=False)(z), module(z))


@pytest.mark.parametrize("case", range(4))
def test_transform_modules_under_bf16_autocast_compute_in_float32_and_return_input_dtype(case):
    module, fn, shape = _module_cases()[case]
    z32 = 2 * torch.randn(*shape) + 1  # well conditioned, so bf16 rounding of the input stays small
    want = fn(z32)  # plain float32, no autocast
    scale = want.abs().max().item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out32 = module(z32)
        z16 = z32.to(torch.bfloat16)
        out16 = module(z16)
        linear = nn.Linear(shape[1], shape[1])
        z_lin = linear(z32)  # bf16 under autocast
        out_lin = module(z_lin)
    # float32 input: float32 output equal to the float32 computation (bf16 matmuls would be ~1e-2 off)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, want, rtol=1e-5, atol=1e-5 * scale)
    # bf16 input: bf16 output, equal to the float32 computation on the same (rounded) input
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16, fn(z16.float()).to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(out16.float(), want, rtol=0.05, atol=0.05 * scale)
    assert z_lin.dtype == torch.bfloat16 and out_lin.dtype == torch.bfloat16
    torch.testing.assert_close(out_lin, fn(z_lin.float()).to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["IterNorm", "PowerTransform"])
def test_transform_modules_do_not_downcast_float64_input(kind):
    # "compute in float32" is meant to protect half precision; a float64 input (gradcheck, float64
    # models) should keep float64 accuracy rather than be rounded through float32.
    z = torch.randn(6, 12, dtype=F64)
    if kind == "IterNorm":
        out, want = intl.IterNorm(iters=5, axis=0)(z), ref_iternorm(z, 5, 0)
    else:
        out, want = intl.PowerTransform(power=0.5, axis=0)(z), ref_spectral_numpy(z, 0.5, 0)
    assert out.dtype == F64
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)


def test_iternorm_module_gradient_flows_under_autocast():
    linear = nn.Linear(32, 24)
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = intl.IterNorm()(linear(x))
    out.float().pow(2).sum().backward()
    assert linear.weight.grad is not None and torch.isfinite(linear.weight.grad).all()


# -----------------------------------------------------------------------------
# 4. The model: multi-crop, EMA target, training, backbone, projector, errors


class MLPBackbone(nn.Module):
    def __init__(self, in_features, feature_dim=24):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, feature_dim), nn.ReLU())
        self.feature_dim = feature_dim

    def forward(self, x):
        return self.net(x)


class PoolBackbone(nn.Module):
    """Accepts any resolution (global average pool), so it can take multi-crop views."""

    def __init__(self, feature_dim=24):
        super().__init__()
        self.conv = nn.Conv2d(3, feature_dim, 3, padding=1)
        self.bn = nn.BatchNorm2d(feature_dim)
        self.feature_dim = feature_dim

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


@pytest.mark.parametrize("axis", [0, 1])
def test_intl_forward_loss_and_gradients_equal_reference_on_per_view_embeddings_in_training(axis):
    backbone = PoolBackbone()
    projector = intl.build_projector(backbone.feature_dim, "16-12")
    model = intl.INTL(backbone, projector, intl.IterNorm(5, axis)).double().train()  # BN on batch statistics
    views = [torch.randn(16, 3, 8, 8, dtype=F64), torch.randn(16, 3, 6, 6, dtype=F64), torch.randn(16, 3, 8, 8, dtype=F64)]
    loss = model(views)["loss"]
    params = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    want_loss = ref_intl_loss([projector(backbone(v)) for v in views], 5, axis)
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=1e-10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-9)


def test_intl_beta_argument_is_used():
    torch.manual_seed(1)
    backbone = MLPBackbone(3 * 4 * 4)
    projector = intl.build_projector(24, "10")
    views = [torch.randn(8, 3, 4, 4, dtype=F64) for _ in range(2)]
    for beta in [0.0, 0.7]:
        model = intl.INTL(backbone, projector, beta=beta).double().eval()
        with torch.no_grad():
            want = ref_intl_loss([projector(backbone(v)) for v in views], 4, 0, beta)
            torch.testing.assert_close(model(views)["loss"], want, rtol=1e-9, atol=1e-10)


def test_momentum_target_is_frozen_copy_that_encodes_view_0_only():
    torch.manual_seed(2)
    backbone = PoolBackbone()
    projector = intl.build_projector(backbone.feature_dim, "16-12")
    model = intl.INTL(backbone, projector, momentum_target=True).double().eval()
    assert model.target is not None
    target_params = list(model.target.parameters())
    online_params = list(backbone.parameters()) + list(projector.parameters())
    assert len(target_params) == len(online_params)
    for t, o in zip(target_params, online_params):
        assert not t.requires_grad and o.requires_grad
        assert t.data_ptr() != o.data_ptr()
        torch.testing.assert_close(t, o)
    # make the target different from the online network
    with torch.no_grad():
        for t in target_params:
            t.add_(0.3 * torch.randn_like(t))
    target_backbone, target_projector = copy.deepcopy(backbone), copy.deepcopy(projector)
    with torch.no_grad():
        for t, c in zip(target_params, list(target_backbone.parameters()) + list(target_projector.parameters())):
            c.copy_(t)
    views = [torch.randn(8, 3, 8, 8, dtype=F64), torch.randn(8, 3, 8, 8, dtype=F64), torch.randn(8, 3, 6, 6, dtype=F64)]
    loss = model(views)["loss"]
    with torch.no_grad():
        z0 = target_projector(target_backbone(views[0]))
    online = [projector(backbone(v)) for v in views[1:]]
    # the target's view 0 is a constant: the trace loss acts on the online views (PAPER_NOTES 5)
    want = ref_intl_loss([z0] + online, 4, 0, trace_on_view0=False)
    torch.testing.assert_close(loss, want, rtol=1e-9, atol=1e-10)
    loss.backward()
    assert all(t.grad is None for t in target_params)
    assert all(o.grad is not None for o in online_params)


def test_intl_m_monitors_the_online_networks_view_1_not_the_targets_view_0():
    # The spectrum and collapse monitor read z / z_hat: they must describe the network being trained.
    torch.manual_seed(4)
    backbone = PoolBackbone()
    projector = intl.build_projector(backbone.feature_dim, "16-12")
    model = intl.INTL(backbone, projector, momentum_target=True).double().eval()
    with torch.no_grad():
        for t in model.target.parameters():
            t.add_(0.3 * torch.randn_like(t))
    views = [torch.randn(8, 3, 8, 8, dtype=F64) for _ in range(3)]
    out = model(views)
    with torch.no_grad():
        z1 = projector(backbone(views[1]))
    torch.testing.assert_close(out["z"], z1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out["z_hat"], ref_iternorm(z1, 4, 0), rtol=1e-9, atol=1e-10)
    assert not out["z"].requires_grad and not out["z_hat"].requires_grad


def test_update_target_is_exponential_moving_average_of_parameters():
    torch.manual_seed(3)
    backbone = MLPBackbone(3 * 4 * 4)
    projector = intl.build_projector(24, "16-8")
    model = intl.INTL(backbone, projector, momentum_target=True)
    with torch.no_grad():
        for p in model.target.parameters():
            p.copy_(torch.randn_like(p))
        for p in list(backbone.parameters()) + list(projector.parameters()):
            p.copy_(torch.randn_like(p))
    before = [p.detach().clone() for p in model.target.parameters()]
    online = [p.detach().clone() for p in list(backbone.parameters()) + list(projector.parameters())]
    m = 0.9
    model.update_target(m)
    for t, t0, o in zip(model.target.parameters(), before, online):
        torch.testing.assert_close(t, m * t0 + (1 - m) * o, rtol=1e-6, atol=1e-7)
        assert not t.requires_grad
    # the online network is untouched
    for o, o0 in zip(list(backbone.parameters()) + list(projector.parameters()), online):
        assert torch.equal(o, o0)
    model.update_target(1.0)  # m = 1 keeps the target
    model.update_target(0.0)  # m = 0 copies the online network
    for t, o in zip(model.target.parameters(), online):
        torch.testing.assert_close(t, o)


def test_ema_momentum_follows_cosine_from_m0_to_one():
    assert intl.ema_momentum(0, 1000, 0.996) == pytest.approx(0.996, abs=1e-12)
    assert intl.ema_momentum(500, 1000, 0.996) == pytest.approx(0.998, abs=1e-12)
    assert intl.ema_momentum(1000, 1000, 0.996) == pytest.approx(1.0, abs=1e-12)
    assert intl.ema_momentum(250, 1000, 0.99) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2, abs=1e-12)
    values = [intl.ema_momentum(s, 100, 0.999) for s in range(101)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_intl_loss_decreases_over_sgd_steps_on_fixed_tiny_problem():
    torch.manual_seed(0)
    B = 32
    images = torch.randn(B, 3, 4, 4)
    views = [images + 0.3 * torch.randn_like(images), images + 0.3 * torch.randn_like(images)]
    backbone = MLPBackbone(3 * 4 * 4, feature_dim=32)
    projector = intl.build_projector(32, "32-16")
    model = intl.INTL(backbone, projector).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = model(views)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_backbone_keys_are_torchvision_minus_fc_and_feature_dim(arch, dim):
    backbone = intl.build_backbone(arch)
    assert backbone.feature_dim == dim
    state = backbone.state_dict()
    assert not any(k.startswith("fc.") for k in state)
    with torch.device("meta"):  # torchvision's network only as the template of names and shapes: no initialisation
        reference = torchvision.models.get_model(arch, weights=None)
    result = reference.load_state_dict(state, strict=False, assign=True)  # still refuses any shape that differs
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    if arch == "resnet18":
        backbone.eval()
        with torch.no_grad():
            assert backbone(torch.randn(2, 3, 64, 64)).shape == (2, dim)


@pytest.fixture(scope="module")
def default_resnet18():
    """intl.build_backbone("resnet18") with every default, built once for the tests that only inspect it."""
    return intl.build_backbone("resnet18")


@pytest.mark.parametrize("stem", ["cifar", "cifar-unpadded", "small-maxpool"])
def test_small_image_stems_are_a_3x3_stride_1_conv1_with_torchvision_keys(stem, default_resnet18):
    plain = default_resnet18
    assert plain.conv1.kernel_size == (7, 7) and plain.conv1.stride == (2, 2)
    backbone = intl.build_backbone("resnet18", stem)
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert backbone.conv1.padding == ((2, 2) if stem == "cifar" else (1, 1)) and backbone.conv1.bias is None
    assert isinstance(backbone.maxpool, nn.Identity) == (stem != "small-maxpool")
    assert set(backbone.state_dict()) == set(plain.state_dict())
    backbone.eval()
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 16, 16)).shape == (2, 512)


def test_backbone_zero_init_residual_zeroes_last_bn_of_each_block(default_resnet18):
    zeroed = default_resnet18  # default True
    for layer in [zeroed.layer1, zeroed.layer2, zeroed.layer3, zeroed.layer4]:
        for block in layer:
            assert torch.all(block.bn2.weight == 0)
    plain = intl.build_backbone("resnet18", zero_init_residual=False)
    assert torch.all(plain.layer1[0].bn2.weight == 1)


def test_projector_is_linear_bn_relu_hidden_layers_and_biased_last_linear():
    proj = intl.build_projector(40, "64-32-16")
    kinds = [type(m) for m in proj.modules() if not isinstance(m, nn.Sequential)]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    linears = [m for m in proj.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(40, 64), (64, 32), (32, 16)]
    assert linears[0].bias is None and linears[1].bias is None and linears[2].bias is not None
    assert [m.num_features for m in proj.modules() if isinstance(m, nn.BatchNorm1d)] == [64, 32]
    assert proj(torch.randn(5, 40)).shape == (5, 16)
    single = intl.build_projector(40, "8")
    assert [type(m) for m in single.modules() if not isinstance(m, nn.Sequential)] == [nn.Linear]


@pytest.mark.parametrize("spec", ["", "abc", "0-5", "12-", "-3", "64--32"])
def test_projector_bad_spec_raises_value_error(spec):
    with pytest.raises(ValueError, match=r"(?i)spec"):
        intl.build_projector(16, spec)


def _bad_input_cases():
    z = torch.randn(6, 10)
    one = torch.randn(1, 10)
    tiny_model = lambda **kw: intl.INTL(MLPBackbone(3 * 4 * 4), intl.build_projector(24, "8"), **kw)
    img = torch.randn(4, 3, 4, 4)
    return {
        "iternorm one sample": (lambda: intl.IterNorm()(one), r"(?i)at least 2 samples"),
        "iternorm axis": (lambda: intl.IterNorm(axis=2)(z), r"(?i)axis"),
        "iternorm axis -1": (lambda: intl.IterNorm(axis=-1)(z), r"(?i)axis"),
        "spectral one sample": (lambda: intl.PowerTransform()(one), r"(?i)at least 2 samples"),
        "spectral axis": (lambda: intl.PowerTransform(axis=3)(z), r"(?i)axis"),
        "spectral singular axis 0": (lambda: intl.PowerTransform(0.5, 0)(torch.randn(8, 8)), r"(?i)singular"),
        "spectral singular axis 1": (lambda: intl.PowerTransform(0.5, 1)(torch.randn(8, 8)), r"(?i)singular"),
        "trace loss one sample": (lambda: intl.trace_loss(one), r"(?i)at least 2 samples"),
        "trace loss axis": (lambda: intl.trace_loss(z, axis=2), r"(?i)axis"),
        "intl loss one view": (lambda: intl.intl_loss([z]), r"(?i)at least 2"),
        "intl loss no views": (lambda: intl.intl_loss([]), r"(?i)at least 2"),
        "intl loss shapes": (lambda: intl.intl_loss([z, torch.randn(6, 9)]), r"(?i)shape"),
        "intl loss batch sizes": (lambda: intl.intl_loss([z, torch.randn(5, 10)]), r"(?i)shape"),
        "intl loss one sample": (lambda: intl.intl_loss([one, one.clone()]), r"(?i)at least 2 samples"),
        "intl loss axis": (lambda: intl.intl_loss([z, z], axis=2), r"(?i)axis"),
        "IterNorm axis": (lambda: intl.IterNorm(axis=2), r"(?i)axis"),
        "PowerTransform axis": (lambda: intl.PowerTransform(axis=2), r"(?i)axis"),
        "INTL axis": (lambda: tiny_model(transform=intl.IterNorm(axis=2)), r"(?i)axis"),
        "INTL one view": (lambda: tiny_model()([img]), r"(?i)at least 2"),
        "INTL one sample": (lambda: tiny_model().eval()([img[:1], img[1:2]]), r"(?i)at least 2 samples"),
        "INTL batch sizes": (lambda: tiny_model()([img, img[:3]]), r"(?i)shape"),
        "backbone arch": (lambda: intl.build_backbone("resnet7"), r"(?i)resnet18"),
    }


@pytest.mark.parametrize("name", list(_bad_input_cases()))
def test_bad_inputs_raise_value_error_with_useful_message(name):
    fn, pattern = _bad_input_cases()[name]
    with pytest.raises(ValueError, match=pattern):
        fn()
