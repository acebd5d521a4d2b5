"""INTL: IterNorm with trace loss, a self-supervised method that modulates the spectrum of the embedding.

Weng et al., "Modulate Your Spectrum in Self-Supervised Learning", ICLR 2024 (arXiv 2305.16789), and its
predecessor, Weng et al., "An Investigation into Whitening Loss for Self-supervised Learning", NeurIPS 2022
(CW-RGP, arXiv 2210.03586).

Sections 1-6 follow the paper's method section, in its order; fenced off below them, what the stages share.

Shapes: B samples per view, D embedding channels, V views. `axis` chooses what is whitened: axis=0, "channel
whitening" (the official default), centres each sample over its D channels, the covariance is B x B (divisor D - 1);
axis=1, "batch whitening", centres each channel over the batch, the covariance is D x D (divisor B - 1). Both are
written once: a transpose swaps the rows being whitened ("units") and what they are measured on, see `_units`.
"""

import copy
import functools
import itertools
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision


# -----------------------------------------------------------------------------
# 1. Encoder f and projector g (the joint-embedding architecture of both papers)

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")

# The first layers of the ResNets of the authors' runs: conv1 (kernel, stride, padding) and whether the max-pool stays.
STEMS = {
    "imagenet": (7, 2, 3, True),  # torchvision's ResNet (the authors' 1-pixel pad + padding 2 is the same padding 3)
    "cifar": (3, 1, 2, False),  # INTL's CIFAR ResNet: a 1-pixel zero pad, then 3x3 stride 1 padding 1 = padding 2
    "cifar-unpadded": (3, 1, 1, False),  # CW-RGP's CIFAR ResNet
    "small-maxpool": (3, 1, 1, True),  # CW-RGP's STL-10 and Tiny-ImageNet ResNet: 3x3 stride 1, max-pool kept
}


def build_backbone(arch="resnet50", stem="imagenet", zero_init_residual=True):
    """A torchvision ResNet without its classifier: images [B, 3, H, W] -> features [B, feature_dim].

    The state_dict keys are torchvision's minus `fc.*`, so exports load into `torchvision.models.<arch>()` (with
    conv1 / maxpool replaced as in `STEMS` for the small-image stems: a zero pad then a padded convolution is one
    convolution). zero_init_residual: every residual block starts as the identity (ResNet-50 and CW-RGP runs).
    """
    if arch not in RESNETS:
        raise ValueError(f"unknown --arch {arch!r}: choose one of {', '.join(RESNETS)}")
    net = torchvision.models.get_model(arch, weights=None, zero_init_residual=zero_init_residual)
    kernel, stride, padding, maxpool = STEMS[stem]
    if stem != "imagenet":
        # Replaced after the ResNet is built, as the authors do: PyTorch's default initialisation.
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel, stride, padding, bias=False)
    if not maxpool:
        net.maxpool = nn.Identity()
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()  # no parameters, so no fc.* keys in the state_dict
    return net


def parse_projector_spec(spec):
    """"8192-8192-8192" -> [8192, 8192, 8192]: the widths of the projector's linear layers."""
    widths = [int(w) for w in str(spec).split("-") if w.isdigit()]
    if len(widths) != len(str(spec).split("-")) or min(widths) < 1:
        raise ValueError(f"cannot parse projector spec {spec!r}: give positive layer widths joined by '-', "
                         "e.g. '8192-8192-8192' (ImageNet) or '2048-2048-2048' (CIFAR)")
    return widths


def build_projector(in_dim, spec, hidden_bias=False):
    """The projector g: features [B, in_dim] -> embedding Z [B, widths[-1]].

    Hidden layers are Linear -> BatchNorm -> ReLU, the last a Linear with bias (the papers' "3 layers" projector);
    hidden Linear layers have no bias, as the BN after them removes it, unless hidden_bias (CW-RGP).
    """
    widths = [in_dim] + parse_projector_spec(spec)
    layers = []
    for d_in, d_out in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(d_in, d_out, bias=hidden_bias), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(widths[-2], widths[-1], bias=True))
    return nn.Sequential(*layers)


# -----------------------------------------------------------------------------
# 2. Spectral transformations (ST) and IterNorm
#
# With the centred embedding X and its covariance S = U diag(l) U^T, a spectral transformation (ST) with function g
# maps X to Z_hat = U g(diag(l)) U^T X: each eigenvalue l_i of S becomes l_i g(l_i)^2. Whitening is g(l) = l^(-1/2);
# IterNorm replaces the eigendecomposition by T Newton steps, a polynomial applied to the spectrum (Theorem 1); the
# ST by eigendecomposition, g(l) = l^(-p) (the paper's power study), is with the relatives in section 6.


def _check_axis(axis):
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 (channel whitening, B x B covariance) or 1 (batch whitening, D x D), got {axis!r}")
    return axis


def _units(z, axis):
    """[B, D] -> the matrix whose rows are the units being whitened: [B, D] (axis 0) or [D, B] (axis 1)."""
    if z.shape[0] < 2:
        raise ValueError(f"whitening needs at least 2 samples, got a batch of {z.shape[0]}: use a larger batch")
    return z if axis == 0 else z.t()


def _centred_covariance(x):
    """x [m, n] (m units measured on n observations) -> (centred x [m, n], covariance S [m, m])."""
    x = x - x.mean(dim=1, keepdim=True)
    return x, x @ x.t() / (x.shape[1] - 1)


def float32_island(method):
    """A module's method(self, x, ...) in float32 at least, also under fp16 / bf16 autocast (Newton's iteration cubes
    matrices, eigendecompositions divide by small eigenvalues). x: a tensor or a list; a tensor returns in x's dtype."""
    @functools.wraps(method)
    def wrapped(self, x, *args, **kwargs):
        tensors = [x] if torch.is_tensor(x) else list(x)
        with torch.autocast(device_type=tensors[0].device.type if tensors else "cpu", enabled=False):
            wide = [t.to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]
            out = method(self, wide[0] if torch.is_tensor(x) else wide, *args, **kwargs)
        return out.to(x.dtype) if torch.is_tensor(x) else out
    return wrapped


class IterNorm(nn.Module):
    """IterNorm: Newton's iteration towards S^(-1/2), without eigendecomposition.

        S_N = S / tr(S),   P_0 = I,   P_k = (3 P_{k-1} - P_{k-1}^3 S_N) / 2,   W = P_T / sqrt(tr(S))

    z [B, D] -> Z_hat = W X [B, D], in a `float32_island`. With finite T the output is not fully whitened (that is
    the point): eigenvalue l of S_N becomes l f_T(l)^2 with the polynomial f_T of Theorem 1.
    """

    def __init__(self, iters=4, axis=0):
        super().__init__()
        if iters < 0:
            raise ValueError(f"IterNorm needs iters >= 0 Newton steps, got {iters}")
        self.iters, self.axis = iters, _check_axis(axis)

    @float32_island
    def forward(self, z):
        x, cov = _centred_covariance(_units(z, self.axis))
        trace = cov.diagonal().sum()
        cov_n = cov / trace
        p = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        for _ in range(self.iters):
            p = 1.5 * p - 0.5 * (p @ p @ p @ cov_n)
        z_hat = (p / trace.sqrt()) @ x
        return z_hat if self.axis == 0 else z_hat.t()


# -----------------------------------------------------------------------------
# 3. Trace loss


def trace_loss(z_hat, axis=0):
    """TL(Z_hat) = sum_i (1 - var_i)^2 over the units i of Z_hat [B, D] -> scalar. Keeping IterNorm's
    output at unit variance drives the spectrum of Z towards equal eigenvalues (Theorem 2)."""
    return (1 - _units(z_hat, _check_axis(axis)).var(dim=1, correction=1)).pow(2).sum()


# -----------------------------------------------------------------------------
# 4. The INTL objective, over the global batch


def alignment_loss(a, b):
    """MSE between L2-normalised rows: 2 - 2 mean_i cos(a_i, b_i). a, b: [B, D] -> scalar."""
    return 2 - 2 * F.cosine_similarity(a, b, dim=1).mean()


def _check_views(views):
    if len(views) < 2 or len({v.shape for v in views}) > 1:
        raise ValueError(f"needs at least 2 views [B, D] of one shape, got {[list(v.shape) for v in views]}")


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each process the gradient of its own rows: every process holds all of dL/dZ
    (the same loss on the same batch), so the sum over processes is world_size x it, which DDP's averaging undoes."""

    @staticmethod
    def forward(ctx, z):
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def gather_with_grad(z):
    """[B_local, D] -> [B_local x world_size, D] in rank order, with gradient (`accelerator.gather` has none);
    the identity with one process. Every process must pass the same batch size (drop_last)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    return _GatherWithGrad.apply(z)


class INTL(nn.Module):
    """Encoder f + projector g + IterNorm + the INTL objective; one forward per step (one DDP sync): forward(V >= 2
    image batches [B, 3, H_v, W_v]) -> {"loss": scalar, "z": an online view's embedding of the global batch
    [B_global, D], "z_hat": its transformed embedding} (z, z_hat detached, for monitoring).

    Each view goes through encoder and projector on its own, as in the authors' runs, so BatchNorm normalises each
    view with its own statistics. transform: `IterNorm()` by default, or `PowerTransform` (the power study).
    beta: the trace-loss weight; None: the official recipes' 0.01 (log2(n) - 3), n = B on axis 0, D on axis 1 (of
    the global batch); 0 drops the trace loss. momentum_target=True is INTL-M: an EMA copy of encoder + projector,
    without gradients, embeds view 0; the online network embeds the other views, each matched to it.
    """

    def __init__(self, backbone, projector, transform=None, beta=None, momentum_target=False):
        super().__init__()
        self.backbone, self.projector, self.beta = backbone, projector, beta
        self.transform = IterNorm() if transform is None else transform
        self.target = None
        if momentum_target:
            self.target = nn.Sequential(copy.deepcopy(backbone), copy.deepcopy(projector)).requires_grad_(False)

    def embed(self, views):
        """Views [B, 3, H_v, W_v] -> per-view embeddings [B, D], one encoder + projector pass per view."""
        return [self.projector(self.backbone(v)) for v in views]

    def forward(self, views):
        if self.target is None:
            return self.objective(self.embed(views))
        with torch.no_grad():  # INTL-M: the target embeds view 0, the online network the others
            z_target = self.target(views[0])
        return self.objective([z_target] + self.embed(views[1:]))

    def objective(self, z):
        """The INTL objective on per-view embeddings of the local batch, each [B, D] -> forward's dict:

            L = 1/(V-1) sum_{v>=1} [ align(Z_hat_v, Z_hat_0) + beta (TL(Z_hat_v) + TL(Z_hat_0)) ]

        with Z_hat_v view v's transformed embedding of the global batch (`gather_with_grad`). With the EMA target,
        view 0 is a constant: its trace loss is left out (it has no gradient), and z, z_hat are the online view 1.
        """
        _check_views(z)
        z = [gather_with_grad(v) for v in z]
        axis = self.transform.axis
        beta = default_beta(z[0].shape[axis]) if self.beta is None else self.beta
        z_hat = [self.transform(v) for v in z]
        tl_0 = 0.0 if self.target is not None else trace_loss(z_hat[0], axis)
        terms = [alignment_loss(v, z_hat[0]) + beta * (trace_loss(v, axis) + tl_0) for v in z_hat[1:]]
        shown = 0 if self.target is None else 1
        return {"loss": sum(terms) / len(terms), "z": z[shown].detach(), "z_hat": z_hat[shown].detach()}

    @torch.no_grad()
    def update_target(self, momentum):
        """INTL-M's EMA: theta_target <- m theta_target + (1 - m) theta_online; buffers copied."""
        online = nn.Sequential(self.backbone, self.projector)
        for t, o in zip(self.target.parameters(), online.parameters()):
            t.lerp_(o, 1 - momentum)
        for t, o in zip(self.target.buffers(), online.buffers()):
            t.copy_(o)


def default_beta(n):
    """The recipes' trace-loss weight 0.01 (log2(n) - 3), n = B on axis 0, D on axis 1; 0 below 8 (negative there)."""
    return max(0.0, 0.01 * (math.log2(n) - 3))


def intl_loss(views, iters=4, axis=0, beta=None):
    """`INTL.objective`'s loss with `IterNorm(iters, axis)`, V >= 2 views [B, D] -> scalar (gathered over processes)."""
    return INTL(nn.Identity(), nn.Identity(), IterNorm(iters, axis), beta).objective(views)["loss"]


# -----------------------------------------------------------------------------
# 5. The EMA target's momentum (INTL-M); the update itself is `INTL.update_target`


def ema_momentum(step, total_steps, m0):
    """Cosine from m0 (step 0) to 1 (last step): m = 1 - (1 - m0) (cos(pi step / total) + 1) / 2."""
    return 1 - (1 - m0) * (math.cos(math.pi * step / total_steps) + 1) / 2


# -----------------------------------------------------------------------------
# 6. What the paper compares INTL with, on the same pipeline: the power ST (Fig. 2), CW-RGP and W-MSE


class PowerTransform(nn.Module):
    """The ST by eigendecomposition with g(l) = l^(-power) (Fig. 2): z [B, D] -> U diag(l^-power) U^T X [B, D], in a
    `float32_island`. power 0.5 is ZCA whitening; power 0 leaves Z unchanged (and collapses, Fig. 2). eps > 0 uses
    S + eps mean(l) I, for batches that are singular although the shapes allow full rank (two identical crops);
    relative to the mean eigenvalue, so that shrinking the embedding cannot make it dominate.
    """

    def __init__(self, power=0.5, axis=0, eps=0.0):
        super().__init__()
        self.power, self.axis, self.eps = power, _check_axis(axis), eps

    @float32_island
    def forward(self, z):
        x = _units(z, self.axis)
        m, n = x.shape
        if self.power > 0 and n - 1 < m and self.eps == 0:
            raise ValueError(f"the {m} x {m} covariance of {m} units centred over {n} values has rank <= {n - 1}: "
                             f"singular by construction, so l^(-{self.power}) is undefined: use a batch smaller than "
                             "the embedding dim (axis 0), a dim smaller than the batch (axis 1), or IterNorm")
        x, cov = _centred_covariance(x)
        ridge = self.eps * cov.diagonal().mean() * torch.eye(m, dtype=cov.dtype, device=cov.device)
        z_hat = MatrixPower.apply(cov + ridge, -self.power) @ x
        return z_hat if self.axis == 0 else z_hat.t()


class MatrixPower(torch.autograd.Function):
    """apply(S, power) -> S^power = U diag(l^power) U^T for a symmetric positive definite S [m, m].

    Autograd through torch.linalg.eigh divides by l_i - l_j, infinite when eigenvalues repeat, as they do in real
    batches. The derivative needs only the divided differences (f(l_i) - f(l_j)) / (l_i - l_j), which tend to
    f'(l_i) as l_j -> l_i (Daleckii-Krein): the backward below uses those and stays finite.
    """

    @staticmethod
    def forward(ctx, cov, power):
        eigvals, eigvecs = torch.linalg.eigh(cov)
        ctx.save_for_backward(eigvals, eigvecs)
        ctx.power = power
        return eigvecs @ torch.diag(eigvals.pow(power)) @ eigvecs.t()

    @staticmethod
    def backward(ctx, grad):
        eigvals, eigvecs = ctx.saved_tensors
        f = eigvals.pow(ctx.power)
        diff_l = eigvals[:, None] - eigvals[None, :]
        diff_f = f[:, None] - f[None, :]
        close = diff_l.abs() <= 1e3 * torch.finfo(eigvals.dtype).eps * eigvals.abs().max()
        mid = (eigvals[:, None] + eigvals[None, :]) / 2
        divided = torch.where(close, ctx.power * mid.pow(ctx.power - 1), diff_f / torch.where(close, 1, diff_l))
        inner = eigvecs.t() @ ((grad + grad.t()) / 2) @ eigvecs
        return eigvecs @ (inner * divided) @ eigvecs.t(), None


class GroupWhitening(nn.Module):
    """CW-RGP's whitening of one sub-batch of one view, h [B, D] -> [B, D]: random group partition, ZCA per group.

    h is centred (axis 0: each sample over its D channels; axis 1: each channel over the batch), its channels
    permuted into `groups` equal groups (forward: a permutation drawn from generator), each ZCA-whitened,
        S_g = X_g X_g^T / (D/G - 1)  (axis 0, [B, B])  or  X_g^T X_g / (B - 1)  (axis 1),
        W_g = ((1 - eps) S_g + eps I)^(-1/2),
    and the permutation undone.
    """

    def __init__(self, groups=4, eps=0.0, axis=0):
        super().__init__()
        if groups < 1:
            raise ValueError(f"--groups must be at least 1, got {groups}")
        self.groups, self.eps, self.axis = groups, eps, _check_axis(axis)

    def forward(self, h, generator=None):
        return self.whiten(h, torch.randperm(h.shape[1], generator=generator))

    @float32_island
    def whiten(self, h, perm):
        """h [B, D] whitened with the channel permutation perm [D] -> [B, D]."""
        batch, dim = _units(h, 0).shape
        if dim % self.groups:
            raise ValueError(f"--groups {self.groups} must divide the embedding dim {dim}: pick a divisor of {dim}")
        units, obs = (batch, dim // self.groups) if self.axis == 0 else (dim // self.groups, batch)
        if self.eps == 0 and obs - 1 < units:  # axis 0: D/G channels per group; axis 1: B samples per sub-batch
            raise ValueError(f"each group's {units} x {units} covariance is singular by construction ({obs} values "
                             f"give rank <= {obs - 1}): change --groups or --w_size, or set --w_eps > 0")
        x = h - h.mean(dim=1 if self.axis == 0 else 0, keepdim=True)
        out = torch.empty_like(x)
        for channels in perm.to(h.device).chunk(self.groups):
            xg = x[:, channels] if self.axis == 0 else x[:, channels].t()  # [units, observations]
            w = MatrixPower.apply(_shrunk(xg @ xg.t() / (xg.shape[1] - 1), self.eps), -0.5)
            out[:, channels] = w @ xg if self.axis == 0 else (w @ xg).t()
        return out



def _shrunk(cov, eps):
    """(1 - eps) S + eps I: the covariance shrunk towards the identity, as CW-RGP's and W-MSE's authors have it."""
    return (1 - eps) * cov + eps * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)


class CholeskyWhitening(nn.Module):
    """W-MSE's batch whitening, h [B, D] -> X L^(-T) [B, D], with (1 - eps) S + eps I = L L^T the Cholesky factor
    of the D x D covariance S: its output's covariance is the identity (for eps = 0). It draws nothing from
    generator."""

    axis = 1

    def __init__(self, eps=0.0):
        super().__init__()
        self.eps = eps

    @float32_island
    def forward(self, h, generator=None):
        batch, dim = h.shape
        if self.eps == 0 and batch - 1 < dim:
            raise ValueError(f"the {dim} x {dim} covariance of {batch} samples is singular by construction: "
                             f"use --w_size > {dim} or a smaller embedding dim, or set --w_eps > 0")
        x, cov = _centred_covariance(_units(h, self.axis))  # [D, B], [D, D]
        lower = torch.linalg.cholesky(_shrunk(cov, self.eps))
        return torch.linalg.solve_triangular(lower, x, upper=False).t()


def covariance_penalty(h, axis=0):
    """CW-RGP's covariance term, h [B, D] -> sum_{i != j} S_ij^2 / m, with S [m, m] the covariance of h's units
    (axis 0: the B samples, each centred over its D channels; axis 1: the D channels)."""
    _, cov = _centred_covariance(_units(h, _check_axis(axis)))
    return (cov - torch.diag(cov.diagonal())).pow(2).sum() / cov.shape[0]


class SubBatchWhitening(nn.Module):
    """CW-RGP (whiten=`GroupWhitening`) and W-MSE (`CholeskyWhitening`): whiten random sub-batches of each view,
    then an MSE between every pair of views, averaged over pairs, sub-batches and `w_iter` repeats (dict as `INTL`).
    As in the authors' runs, the encoder runs once per view but the projector once on all views together (its
    BatchNorm sees the V x B embeddings as one batch). normalized: 2 - 2 cos between rows; else the MSE over the
    entries. covariance = (weight, epochs): CW-RGP's covariance term on the un-whitened embeddings (its ImageNet
    runs) for the first `epochs` epochs, averaged like the loss (a sub-batch stands for one GPU's batch of theirs).
    """

    def __init__(self, backbone, projector, whiten, w_size, w_iter=1, normalized=True, covariance=(0.0, 0)):
        super().__init__()
        self.backbone, self.projector, self.whiten = backbone, projector, whiten
        self.w_size, self.w_iter, (self.cov_weight, self.cov_epochs) = w_size, w_iter, covariance
        self.pair_loss = alignment_loss if normalized else F.mse_loss

    def embed(self, views):
        """Views [B, 3, H, W] -> per-view embeddings [B, D]: one encoder pass per view, one projector pass."""
        features = [self.backbone(v) for v in views]
        return list(self.projector(torch.cat(features)).split([len(f) for f in features]))

    def forward(self, views, step=0, epoch=0):
        """step seeds the sub-batches and permutations (the same on all processes); epoch ends the covariance term."""
        return self.objective(self.embed(views), step, epoch)

    @float32_island
    def objective(self, z, step=0, epoch=0):
        """Per-view embeddings of the local batch, each [B, D] -> forward's dict, over the global batch."""
        _check_views(z)
        z = [gather_with_grad(v) for v in z]
        batch = z[0].shape[0]
        if batch % self.w_size:
            raise ValueError(f"the global batch {batch} is not a multiple of --w_size {self.w_size}: "
                             "make --batch_size (the global batch) a multiple of it")
        generator = torch.Generator().manual_seed(step)
        losses, covariance_terms, z_hat = [], [], torch.empty_like(z[0])
        with_covariance = self.cov_weight > 0 and epoch < self.cov_epochs
        for _ in range(self.w_iter):
            for rows in torch.randperm(batch, generator=generator).to(z[0].device).split(self.w_size):
                whitened = [self.whiten(v[rows], generator) for v in z]
                z_hat[rows] = whitened[0].detach()
                losses += [self.pair_loss(a, b) for a, b in itertools.combinations(whitened, 2)]
                if with_covariance:
                    covariance_terms.append(sum(covariance_penalty(v[rows], self.whiten.axis) for v in z))
        loss = sum(losses) / len(losses)
        if with_covariance:
            loss = loss + self.cov_weight * sum(covariance_terms) / len(covariance_terms)
        return {"loss": loss, "z": z[0].detach(), "z_hat": z_hat}


# =============================================================================
# What the stages share
#
# The method ends above. Below is what pretrain.py, linear_eval.py and detect_transfer.py share: data, features and
# the 5-NN, configuration checks, one atomic write and one lock, checkpoints, the error boundary, loading a backbone.
# =============================================================================

import argparse
import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import datasets as hf_datasets
import huggingface_hub
import numpy as np
from PIL import Image as PILImage
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torchvision.transforms import v2


# ----------------------------------------------------------------------------- data
#
# Every source becomes an ImageSplit: "digits" or None (scikit-learn's, offline), a save_to_disk folder, an image
# folder (class sub-folders, optionally under train/ val/ test/; or unlabelled images inside), a Hub id "id[:config]".

DIGITS_SOURCE = "digits"
# The sub-folders of an image folder that are splits, not classes. A split is asked for by the name its dataset gives
# it (CIFAR-10 "test", ImageNet-1k "validation", a folder "val").
_SPLIT_FOLDERS = ("train", "training", "val", "validation", "valid", "test", "testing")
_HOW_TO_PROVIDE_DATA = ("Give --dataset a Hub dataset id (cached by a run with network access), a folder of images "
                        "(in class sub-folders ROOT/<class>/..., optionally under ROOT/train/ and ROOT/val/; or "
                        "unlabelled, directly inside), a folder written by save_to_disk, or digits (built in).")


@dataclass
class ImageSplit:
    """One split: its rows, image column, integer label column (None: unlabelled), classes (if known) and origin."""

    dataset: hf_datasets.Dataset
    image_column: str
    label_column: str | None
    num_classes: int | None
    source: str


def load_image_split(source, split, image_column=None, label_column=None, accelerator=None):
    """One split ("train", "test", ...) of any source above -> ImageSplit; the columns are detected unless given.
    With an `accelerator`, its main process loads first (a Hub dataset is prepared once), then the others."""
    if accelerator is not None:
        with accelerator.main_process_first():
            return load_image_split(source, split, image_column, label_column)
    source = os.fspath(source or DIGITS_SOURCE)
    path = os.path.expanduser(source)
    if source == DIGITS_SOURCE:
        dataset = _load_digits_split(split)
    elif os.path.isdir(path):
        # The files that Dataset.save_to_disk and DatasetDict.save_to_disk write.
        saved = any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))
        dataset, source = (_load_saved_split if saved else _load_image_folder_split)(path, split), path
    elif os.path.isfile(path):  # an archive or a single image, say
        raise ValueError(f"--dataset {source} is a file, not a folder (extract an archive into one first). "
                         f"{_HOW_TO_PROVIDE_DATA}")
    elif looks_like_path(source):  # a typo in a path must not turn into a confusing Hub lookup
        raise ValueError(f"dataset folder {source} does not exist. {_HOW_TO_PROVIDE_DATA}")
    else:
        dataset, source = _load_hub_split(source, split), f"Hugging Face Hub dataset {source!r}"
    return _make_image_split(dataset, image_column, label_column, f"{source} (split {split!r})")


def _load_digits_split(split):
    """scikit-learn's digits as 32x32 RGB PNGs, in a seeded, class-stratified 80/20 train/test split: the same on
    every call, so that pre-training never sees the images that report test accuracy."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn is slow to import, only digits need it
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = digits.target.astype(np.int64)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0)
    indices = np.sort(train if _split_named(split, ["train", "test"], DIGITS_SOURCE) == "train" else test)
    images = []
    for pixels in digits.images[indices]:
        # Resampled in float, so that the 0..16 -> 0..255 rescale is rounded once; bicubic overshoots at edges.
        small = PILImage.fromarray((pixels * (255.0 / 16.0)).astype(np.float32), mode="F")
        big = np.asarray(small.resize((32, 32), PILImage.Resampling.BICUBIC))
        images.append(PILImage.fromarray(np.clip(np.rint(big), 0, 255).astype(np.uint8), mode="L").convert("RGB"))
    features = hf_datasets.Features({"image": hf_datasets.Image(),
                                     "label": hf_datasets.ClassLabel(names=[str(d) for d in range(10)])})
    return hf_datasets.Dataset.from_dict({"image": images, "label": labels[indices].tolist()}, features=features,
                                         split=split)


def looks_like_path(source):
    """True for strings that can only be meant as local paths, never as Hub ids."""
    return (source.startswith(("/", "./", "../", "~", "\\")) or source in (".", "..") or source.count("/") > 1
            or (os.sep != "/" and os.sep in source))


def _load_saved_split(path, split):
    try:
        saved = hf_datasets.load_from_disk(path)
    except (OSError, ValueError, IndexError) as error:  # IndexError: a split saved without rows has no .arrow file
        why = "a split of it has no rows" if isinstance(error, IndexError) else f"{type(error).__name__}: {error}"
        raise ValueError(f"cannot load {path} (written by save_to_disk): {why}; save it again") from None
    splits = saved if isinstance(saved, hf_datasets.DatasetDict) else {"train": saved}  # a Dataset: training only
    return splits[_split_named(split, splits, path)]


def _load_image_folder_split(root, split):
    """ROOT/<class>/... or ROOT/<split>/<class>/...: an image at any depth below a class folder has that class's index
    among all splits' sorted class names. Without class folders, the images directly inside are unlabelled."""
    roots = {name: os.path.join(root, name) for name in _sub_folders(root) if name.lower() in _SPLIT_FOLDERS}
    roots = roots or {"train": root}
    class_names = sorted({name for folder in roots.values() for name in _sub_folders(folder)})
    split = _split_named(split, roots, root)
    paths, labels = [], []
    for label, name in enumerate(class_names or [""]):  # "": no class folders, the images in the folder itself
        found = _image_files(os.path.join(roots[split], name))
        paths += found
        labels += [label] * len(found)
    if not paths:
        raise ValueError(f"{root} has no image files (split {split!r}). {_HOW_TO_PROVIDE_DATA}")
    columns, features = {"image": [{"path": p, "bytes": None} for p in paths]}, {"image": hf_datasets.Image()}
    if class_names:
        columns["label"], features["label"] = labels, hf_datasets.ClassLabel(names=class_names)
    return hf_datasets.Dataset.from_dict(columns, features=hf_datasets.Features(features), split=split)


def _sub_folders(path):
    """The folders in `path`, links included; a link to `path` or above is refused (its images would count twice)."""
    names = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    for name in names:
        target = os.path.realpath(os.path.join(path, name))
        if os.path.commonpath([target, os.path.realpath(path)]) == target:
            raise ValueError(f"{os.path.join(path, name)} is a link to {target}, the folder that holds it or one "
                             "above: every image would count twice; remove the link")
    return names


def _image_files(folder):
    """The image files below `folder`, at any depth, in sorted order; hidden files and folders are skipped."""
    extensions = {e.lower() for e in PILImage.registered_extensions()}
    files = []
    for parent, sub_folders, names in os.walk(folder):
        sub_folders[:] = sorted(d for d in sub_folders if not d.startswith("."))
        files += [os.path.join(parent, name) for name in sorted(names)
                  if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions]
    return files


def _load_hub_split(source, split):
    """A split of Hub dataset "id" or "id:config", through datasets' cache (which prepares all splits anyway)."""
    repo_id, _, config_name = source.partition(":")
    try:
        loaded = hf_datasets.load_dataset(repo_id, config_name or None)
    except (ConnectionError, FileNotFoundError) as err:  # not found, or offline and not in the cache
        offline = "offline mode is on (HF_HUB_OFFLINE): " if hf_datasets.config.HF_HUB_OFFLINE else ""
        raise ValueError(f"could not load Hugging Face Hub dataset {source!r}: {offline}{err}. "
                         f"{_HOW_TO_PROVIDE_DATA}") from None
    return loaded[_split_named(split, loaded, source)]


def _split_named(split, available, where):
    if split not in available:
        raise ValueError(f"{where} has no split {split!r}; available splits: {sorted(available)}")
    return split


def _make_image_split(dataset, image_column, label_column, description):
    """The given columns checked, or detected: the first Image feature, "image" or "img"; the first of "label",
    "fine_label", a ClassLabel, "labels" that holds integer class labels (none: unlabelled)."""
    features, columns = dataset.features, list(dataset.features)
    for role, name in (("image", image_column), ("label", label_column)):
        if name is not None and name not in features:
            raise ValueError(f"{description} has no {role} column {name!r}; columns: {columns}")
    image_column = image_column or next((c for c in columns if isinstance(features[c], hf_datasets.Image)),
                                        next((c for c in ("image", "img") if c in features), None))
    if image_column is None:
        raise ValueError(f"{description} has no image column (no Image feature, no column 'image' or 'img'); name it "
                         f"with --image_column (columns: {columns})")
    if label_column is None:
        class_labels = [c for c in columns if isinstance(features[c], hf_datasets.ClassLabel)]
        label_column = next((c for c in ["label", "fine_label", *class_labels, "labels"]
                             if c in features and _holds_class_indices(features[c])), None)
    elif not _holds_class_indices(features[label_column]):  # strings, say, are not class indices
        raise ValueError(f"label column {label_column!r} of {description} is {features[label_column]}, not integer "
                         "class labels: pretraining needs none (leave --label_column out); evaluation: map the values "
                         f"to class indices (Dataset.class_encode_column) or name another --label_column (columns: "
                         f"{columns})")
    feature = features[label_column] if label_column else None
    num_classes = feature.num_classes if isinstance(feature, hf_datasets.ClassLabel) else None
    return ImageSplit(dataset, image_column, label_column, num_classes, description)


def _holds_class_indices(feature):
    return isinstance(feature, hf_datasets.ClassLabel) or (
        isinstance(feature, hf_datasets.Value) and feature.dtype.startswith(("int", "uint")))


# ----------------------------------------------------------------------------- torch side


class UnreadableImageError(OSError):
    """An image that cannot be decoded; its message names the file."""


class ImageDataset(torch.utils.data.Dataset):
    """An ImageSplit for PyTorch: item i is (transform(RGB PIL image), label), label -1 when unlabelled. PIL decodes
    the images, not datasets, so that a broken one raises an error naming its file. Picklable when `transform` is."""

    def __init__(self, split, transform=None):
        # Only the needed columns (any other would be converted at each access), as plain Python rows.
        columns = [split.image_column] + ([split.label_column] if split.label_column else [])
        rows = split.dataset.select_columns(columns).cast_column(split.image_column, hf_datasets.Image(decode=False))
        self.rows = rows.with_format(None)
        self.image_column, self.label_column = split.image_column, split.label_column
        self.source, self.transform = split.source, transform

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        row = self.rows[int(index)]
        value = row[self.image_column] or {}  # undecoded: {"bytes", "path"}
        path, data = value.get("path"), value.get("bytes")
        try:
            with PILImage.open(io.BytesIO(data) if data is not None else path) as handle:
                image = to_rgb(handle)  # decodes fully, so that truncation shows up here
        except Exception as err:  # PIL raises many types on corrupt data (OSError, SyntaxError, ...)
            where = f"file {path!r}" if path else "no file path"
            raise UnreadableImageError(f"Cannot read image #{index} of {self.source} ({where}): {err}") from err
        if self.transform is not None:
            image = self.transform(image)
        label = row[self.label_column] if self.label_column else None
        return image, -1 if label is None else int(label)


def to_rgb(image):
    """Any PIL image -> the 8-bit RGB image it shows, decoded fully: a 16-bit v becomes round(v / 257) (convert("RGB")
    clips it at 255), a transparent pixel white as a page behind it (not the colour stored under it)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        image = PILImage.fromarray(((np.clip(np.asarray(image, np.int64), 0, 65535) + 128) // 257).astype(np.uint8))
    elif "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(image.convert("RGBA"), np.int64)
        rgb, alpha = rgba[..., :3], rgba[..., 3:]
        image = PILImage.fromarray(((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8))  # rounded
    return image.convert("RGB")


# ----------------------------------------------------------------------------- features and kNN


def eval_resize(image_size, resize=None):
    """The evaluation input's side before its centre crop: size / 0.875 from 128 px (224 -> 256), else the size."""
    return resize or (round(image_size / 0.875) if image_size >= 128 else image_size)


def eval_transform(image_size, mean, std, resize=None, interpolation="bilinear"):
    """Every evaluation's un-augmented input: Resize (bilinear; CW-RGP's STL-10: bicubic) and CenterCrop."""
    return v2.Compose([
        v2.Resize(eval_resize(image_size, resize), interpolation=v2.InterpolationMode[interpolation.upper()],
                  antialias=True),
        v2.CenterCrop(image_size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


@torch.no_grad()
def extract_features(backbone, loader, accelerator):
    """Frozen features of every sample exactly once: ([N, feature_dim] float32, [N] labels) on the CPU. `loader`
    comes from `accelerator.prepare`, so that gather_for_metrics drops the samples that even out the last batch."""
    backbone.eval()  # a training caller sets it back to train()
    features, labels = [], []
    for images, targets in loader:
        with accelerator.autocast():
            f = backbone(images)
        f, targets = accelerator.gather_for_metrics((f.float().contiguous(), targets))
        features.append(f.cpu())
        labels.append(targets.cpu())
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def nearest_neighbours(train_features, test_features, k=5, chunk=1024, train_chunk=32768, device=None):
    """Each test feature's k nearest training features -> (indices, keys ||t||^2 - 2 q.t), [N_test, k] nearest first.
    Bounded memory: `chunk` queries meet `train_chunk` training features at a time on `device`, each query keeping a
    running top-k; float32 keys rank neighbours closer than about 1e-7 (||q||^2 + ||t||^2) otherwise than float64."""
    device = torch.device(device) if device is not None else train_features.device
    k = min(k, len(train_features))
    best_key = torch.full((len(test_features), k), float("inf"), device=device)
    best_index = torch.zeros((len(test_features), k), dtype=torch.long, device=device)
    for start in range(0, len(train_features), train_chunk):
        block = train_features[start:start + train_chunk].to(device, torch.float32)  # a view if already there
        block_norms = block.square().sum(1)
        for first in range(0, len(test_features), chunk):
            rows = slice(first, first + chunk)
            queries = test_features[rows].to(device, torch.float32)
            key = torch.addmm(block_norms[None], queries, block.t(), alpha=-2.0)
            block_key, block_index = key.topk(min(k, len(block)), dim=1, largest=False)
            merged_key = torch.cat([best_key[rows], block_key], 1)
            merged_index = torch.cat([best_index[rows], block_index + start], 1)
            best_key[rows], order = merged_key.topk(k, dim=1, largest=False)  # sorted: nearest first
            best_index[rows] = merged_index.gather(1, order)
    return best_index, best_key


@torch.no_grad()
def knn_classify(train_features, train_labels, test_features, test_labels, k=5, **blocks):
    """k-NN accuracy (%), Euclidean, one vote per neighbour (the papers' 5-NN) -> {"top1": float}. A tie between
    classes goes to the smallest class id, as the authors' argmax over the votes. `blocks`: nearest_neighbours'."""
    nearest, _ = nearest_neighbours(train_features, test_features, k, **blocks)
    # The labels as indices among the classes present: memory does not grow with the label values.
    classes, indices = torch.unique(torch.cat([train_labels, test_labels]), return_inverse=True)
    train_labels, test_labels = indices.split([len(train_labels), len(test_labels)])
    votes = torch.zeros(len(nearest), len(classes), dtype=torch.long, device=nearest.device)
    votes.scatter_add_(1, train_labels.to(nearest.device)[nearest], torch.ones_like(nearest))
    # Votes x classes + (classes - 1 - class): no two scores are equal, so the tie rule does not rest on which of
    # equal maxima argmax returns.
    scores = votes * len(classes) + torch.arange(len(classes) - 1, -1, -1, device=nearest.device)
    correct = (scores.argmax(1) == test_labels.to(nearest.device)).sum().item()
    return {"top1": 100.0 * correct / len(test_features)}


# ----------------------------------------------------------------------------- the loops of the three stages


def epoch_order(num_samples, seed, epoch):
    """One epoch's shuffled sample order, from (seed, epoch) alone: alike on every process and after a resume."""
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def per_process_batch(global_batch, processes):
    """Each process's equal share of the global --batch_size; one that does not split is refused, naming one that does."""
    if global_batch % processes:
        nearest = max(processes, round(global_batch / processes) * processes)
        raise ValueError(f"--batch_size {global_batch} is the global batch and must split evenly over the {processes} "
                         f"processes: give --batch_size {nearest}")
    return global_batch // processes


def sync_batchnorm(model, accelerator):
    """With several GPU processes, BatchNorm statistics over the global batch (the authors' runs); else unchanged."""
    if accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def read_jsonl(path):
    """The JSON objects of a JSON-lines file, none if it is missing; a last line cut short by a crash is left out."""
    path = Path(path)
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return [r for r in records if isinstance(r, dict)]


def truncate_jsonl(path, last, key="step"):
    """On resume: keep the records of a JSON-lines log up to `last` (by `key`), drop what will be written again."""
    kept = [r for r in read_jsonl(path) if r.get(key, 0) <= last]
    write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))


# ----------------------------------------------------------------------------- configuration and flags


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help: the description as written, and a flag's default where it says something (not None, off or empty)."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False, "") else super()._get_help_string(action)


def explicit_flags(parser, argv):
    """The names of the flags given on the command line (so a preset does not override them)."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def folder(path):
    """The argparse type of --output_dir and --resume: "~" expanded (a quoted '~/runs' too); "" is refused."""
    if not path.strip():
        raise argparse.ArgumentTypeError("an empty path would be the current folder: give a folder")
    return os.path.expanduser(path)


def check_settings(settings, parser, ranges, where="--"):
    """Refuse any setting (of the flags: where="--"; of a saved configuration: where=its file) that its flag would
    not take: the parser's types, numbers of values, choices, and `ranges` ({flag: "[1, inf)"}). None passes."""
    actions = {action.dest: action for action in parser._actions}
    for key, value in settings.items():
        if key not in actions or value is None:
            continue
        shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
        if problem := _setting_problem(actions[key], value, ranges.get(key)):
            raise ValueError(f"--{key} {shown}: {problem}" if where == "--" else f"{where}: {key} is {value!r}, "
                             f"{problem}; the file is damaged or was edited: repair it or use another one")
    precision = settings.get("mixed_precision", "no")
    if precision is None and where == "--":  # Accelerate's config, which `accelerate launch` puts there
        precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if precision == "fp16" and not torch.cuda.is_available():  # Accelerate would report fp16 and compute in float32
        raise ValueError("--mixed_precision fp16 needs a GPU: on a CPU use bf16 or no" if where == "--" else
                         f"{where}: mixed_precision is 'fp16', which needs a GPU: resume the run on a GPU")


def _setting_problem(action, value, interval):
    several = action.nargs in ("*", "+") or isinstance(action.nargs, int) and action.nargs > 0
    if isinstance(value, (list, tuple)) != several:
        return "must be a list of values" if several else "must be a single value"
    values = list(value) if several else [value]
    if several and isinstance(action.nargs, int) and len(values) != action.nargs:
        return f"must be {action.nargs} values"
    boolean = isinstance(action.const, bool) or isinstance(action, argparse.BooleanOptionalAction)
    for v in values:
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if boolean and not isinstance(v, bool):
            return "must be true or false"
        if action.type in (int, float) and not (number and (action.type is float or float(v).is_integer())):
            return f"must be {'an integer' if action.type is int else 'a number'}"
        if action.type is str and not isinstance(v, str):
            return "must be a string"
        if action.choices is not None and v not in action.choices:
            return f"must be one of {', '.join(map(str, action.choices))}"
        if interval:  # written as in maths, "[1, inf)" or "(0, 1]"; inf and NaN lie in none
            low, high = (float(bound) for bound in interval[1:-1].split(","))
            above = v >= low if interval[0] == "[" else v > low
            below = v <= high if interval[-1] == "]" else v < high
            if not (number and math.isfinite(v) and above and below):
                return f"{'each value ' if several else ''}must be in {interval}"
    return None


def keep_resumed_config(config, explicit, checkpoint, run_flags, parser, ranges, check=lambda config: None):
    """A resumed run takes the configuration saved in `checkpoint`, checked as the flags are. Of the `explicit` flags
    only run_flags[0] ones (logging, saving) may differ, and one not given keeps its saved value; run_flags[1] ones
    (--output_dir, --stop_after_steps) never come from the checkpoint. check(config): more checks, naming the file."""
    run_control, per_command = run_flags
    state_file = Path(checkpoint) / "trainer_state.json"
    saved = read_trainer_state(state_file)["config"]
    check_settings({k: v for k, v in saved.items() if k not in per_command}, parser, ranges, state_file)
    changed = changed_settings(saved, {k: getattr(config, k) for k in explicit if k not in run_control})
    if changed:
        raise ValueError(f"--{changed[0]} differs from the checkpoint's configuration; a resumed run keeps its "
                         "configuration: drop the flag or start a new run in another --output_dir")
    for key, value in saved.items():
        if key not in per_command and not (key in run_control and key in explicit):
            setattr(config, key, value)
    try:
        check(config)
    except ValueError as error:
        raise ValueError(f"{state_file}: {error}; the file is damaged or was edited: repair it") from None


def changed_settings(saved, current):
    """The keys of `current` whose values differ from `saved` ones, compared as JSON (a tuple equals its list)."""
    return [key for key, value in current.items() if saved.get(key) != json.loads(json.dumps(value))]


# ----------------------------------------------------------------------------- nothing lost or half-written
#
# A file or folder is written under a temporary name and renamed into place (`replacing`): a crash, a full disk or a
# kill leaves the old version or the new one. One run per output folder (`locked`); an earlier run's results go only
# with --overwrite (`clear_earlier_run`).


@contextlib.contextmanager
def replacing(path):
    """Yields a temporary path next to `path` to write the new file or folder to, renamed into place when the block
    ends without an error (an old folder is renamed away first, then deleted); on an error the old version stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")  # same suffix: savefig picks the format from it
    old = path.with_name(f".old-{os.getpid()}-{path.name}")
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            _remove(leftover)


def _remove(path):
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def write_text_atomically(path, text):
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_json(path):
    """A JSON file -> the object it holds (every JSON file of this project holds one), else a ValueError naming it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except json.JSONDecodeError as error:
        value = error
    if not isinstance(value, dict):
        why = f"not valid JSON ({value})" if isinstance(value, ValueError) else "not a JSON object"
        raise ValueError(f"{path} is {why}: the file is damaged or was not written by this project")
    return value


@contextlib.contextmanager
def locked(output_dir, main_process=True):
    """One run per output folder: the main process holds an exclusive lock on OUTPUT_DIR/.lock (released even after
    kill -9), refusing a second run at once, named by its process; made first, it checks the folder can be written."""
    import fcntl  # POSIX: Linux and macOS

    if not main_process:
        yield
        return
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise ValueError(f"{path} is in use by another run (process {handle.read().strip() or 'unknown'}): wait "
                             "for it to end, or give another --output_dir") from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield  # closing the file releases the lock


def clear_earlier_run(output_dir, results, overwrite, resumes=None, say=print, main_process=True):
    """Before a run writes, on every process, under `locked`: an earlier run's `results` in output_dir are refused, or
    removed with --overwrite, unless the run resumes its own checkpoint `resumes`; what interrupted saves left goes."""
    output_dir = Path(output_dir)
    paths = {name: output_dir / name for name in results}
    own = resumes is not None and output_dir.resolve() in Path(resumes).resolve().parents
    found = [] if own else [name + "/" * path.is_dir() for name, path in paths.items() if path.is_file() or (
        path.is_dir() and any(not entry.name.startswith(".") for entry in path.iterdir()))]
    if found and not overwrite:
        resumable = " (or continue the earlier run with --resume latest)" if any(
            name.startswith("checkpoints") for name in results) else ""
        raise ValueError(f"--output_dir {output_dir} already holds {', '.join(found)} of an earlier run, which this "
                         f"command would replace: give another --output_dir{resumable}, or add --overwrite to replace "
                         f"{'them' if len(found) > 1 else 'it'}")
    if not main_process:
        return
    for name in found:
        _remove(paths[name.rstrip("/")])
    if found:
        say(f"--overwrite: removed {', '.join(found)} of the earlier run in {output_dir}")
    for folder in [path for path in paths.values() if path.is_dir()]:
        for leftover in sorted([*folder.glob(".tmp-*"), *folder.glob(".old-*")]):
            _remove(leftover)
            say(f"removed {leftover}, left by an interrupted save")


def save_state_atomically(accelerator, folder, state_file, state, keep):
    """On every process: accelerator.save_state into a hidden sibling of `folder`, plus `state_file` (JSON), renamed
    into place (an interrupted save leaves the earlier checkpoints intact); then the `keep` newest "prefix-*" stay."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")  # one name for all processes: each writes its RNG state into it
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()  # save_state returns per process: the rename must wait for the slowest one
        if accelerator.is_main_process:
            (tmp / state_file).write_text(json.dumps(state, indent=2))
            with replacing(folder) as new:
                os.replace(tmp, new)
            prefix = folder.name.split("-")[0]
            for old in sorted(p for p in folder.parent.glob(f"{prefix}-*") if p.name <= folder.name)[:-keep]:
                shutil.rmtree(old)
    finally:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


# ----------------------------------------------------------------------------- resuming from a checkpoint


def latest_checkpoint(output_dir):
    """The newest complete checkpoint OUTPUT_DIR/checkpoints/step-* (it has its trainer_state.json), or None."""
    newest = max((Path(output_dir) / "checkpoints").glob("step-*/trainer_state.json"), default=None)
    return newest.parent if newest else None


def find_checkpoint(resume, output_dir, kind=""):
    """--resume: "latest" (the newest checkpoint in output_dir) or a checkpoint folder (of `kind`, "detection")."""
    if resume == "latest":
        checkpoint = latest_checkpoint(output_dir or ".")
        if checkpoint is None:
            raise ValueError(f"--resume latest: no checkpoint in {output_dir}/checkpoints; "
                             "give a checkpoint folder or start without --resume")
        return checkpoint
    checkpoint = Path(resume)
    if not (checkpoint / "trainer_state.json").is_file() or not (checkpoint / "model.safetensors").is_file():
        raise ValueError(f"--resume {resume}: not a {kind + ' ' if kind else ''}checkpoint folder (it needs "
                         "trainer_state.json and model.safetensors); use 'latest' or a folder under "
                         "OUTPUT_DIR/checkpoints")
    return checkpoint


def read_trainer_state(state_file):
    """A checkpoint's trainer_state.json -> its object, which holds the run's "config"."""
    state = read_json(state_file)
    if not isinstance(state.get("config"), dict):
        raise ValueError(f"{state_file} holds no 'config' object: it was not written by this project, or is damaged")
    return state


def load_checkpoint(accelerator, resume, output_dir, kind="", check_state=None):
    """--resume ("latest" or a folder): a checkpoint loaded into what `accelerator` prepared -> (folder, its state).
    check_state(folder, state) may refuse the state (another number of processes, ...)."""
    checkpoint = find_checkpoint(resume, output_dir, kind)
    state = read_trainer_state(checkpoint / "trainer_state.json")
    if check_state is not None:
        check_state(checkpoint, state)
    try:
        load_state(accelerator, checkpoint)
    except ValueError as error:
        raise ValueError(f"{error}; resume from an earlier checkpoint folder instead") from None
    return checkpoint, state


def load_state(accelerator, checkpoint):
    """accelerator.load_state(checkpoint), after each of its files was read and its weights checked: a file that does
    not load is named, "FILE could not be read: <the library's own message>"."""
    from accelerate.utils import load as torch_load  # torch.load as load_state calls it (weights_only=True)

    for path in sorted(Path(checkpoint).iterdir()):
        if path.suffix == ".safetensors":
            check_weights(read_safetensors(path), path)
        elif path.suffix in (".bin", ".pkl", ".pt"):
            try:
                torch_load(path, map_location="cpu")
            except Exception as error:  # torch.load and pickle raise many types on a damaged file
                raise unreadable(path, error) from None
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # a file that reads but does not fit this run (another model or optimiser)
        raise ValueError(f"{checkpoint} does not fit this run: {type(error).__name__}: {error}") from None


def read_safetensors(path):
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise unreadable(path, error) from None


def unreadable(path, error):
    """"FILE could not be read: <the library's own message>", but never torch's advice of weights_only=False (which
    would run what the file holds)."""
    if isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in str(error):
        why = "it holds Python objects that torch.load(weights_only=True) refuses (only tensors and containers load)"
    else:
        lines = str(error).strip().splitlines()
        why = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return ValueError(f"{path} could not be read: {why}")


def check_weights(weights, where):
    """The one check of loaded weights, whatever their source: a network failing it computes NaN or chance silently."""
    for key, value in weights.items():
        if not value.is_floating_point():
            if key.endswith("num_batches_tracked") and not value.dtype == torch.bool:
                continue
            raise ValueError(f"{where}: tensor {key!r} is {value.dtype}, not floating point: these are not the weights "
                             "of a network this project trained (a quantised or damaged file)")
        if not torch.isfinite(value).all():
            raise ValueError(f"{where}: tensor {key!r} holds {int((~torch.isfinite(value)).sum())} NaN / Inf value(s): "
                             "these weights are broken (a diverged run or a damaged file); use an earlier checkpoint")
        if key.endswith("running_var") and (value < 0).any():
            raise ValueError(f"{where}: tensor {key!r} holds negative variances: the file is damaged")


# ----------------------------------------------------------------------------- the error boundary, Ctrl-C and SIGTERM


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM in a loop: the one line that says where it stopped ("step 12") and how to continue."""

    def __init__(self, where, checkpoint):
        super().__init__(f"interrupted at {where}, before the first checkpoint: nothing to resume; start the run again"
                         if checkpoint is None else f"interrupted at {where}; continue with --resume latest (from the "
                         f"last checkpoint, {Path(checkpoint).name})")


# A Ctrl-C or SIGTERM, remembered: Python discards the KeyboardInterrupt when it lands in a finaliser (a __del__), so
# the training loops also stop at their next step when this is set.
stop_requested = False


def run(main, argv=None, interrupted="interrupted"):
    """Each script's error boundary: main(argv), SIGTERM (a cluster scheduler's) raising KeyboardInterrupt as Ctrl-C
    does. Our errors (naming the file and the field) and the libraries' (an OSError names its file, a Hub error its
    repo) end in one line "error: ..." and exit status 1; an interruption in its line and status 130, as a shell's."""
    def on_signal(signum, frame):
        global stop_requested
        stop_requested = True
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        main(argv)
    except (ValueError, OSError, FloatingPointError, SafetensorError) as error:
        text = str(error)
        if isinstance(error, UnreadableImageError):  # a DataLoader worker re-raises it wrapped in its traceback
            text = text.strip().splitlines()[-1].split("UnreadableImageError: ")[-1]
        sys.exit("error: " + " ".join(text.split()))  # one line, also for a library's message of several
    except KeyboardInterrupt as interrupt:
        print(str(interrupt) or interrupted, file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- loading a backbone
#
# load_backbone loads strictly from an export folder (model.safetensors + config.json), a Hub model id "owner/name"
# (its export, through huggingface_hub's cache; HF_HUB_OFFLINE=1: the cache only) or a pretrain.py checkpoint folder;
# other weights (an official .pth.tar, a bare .safetensors file) are exported first by `linear_eval.py export`.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
EXPORT_FILES = ("model.safetensors", "config.json")


def load_backbone(source, revision=None):
    """-> (backbone in eval mode, config: arch, stem, feature_dim, image_size, mean, std and what the export recorded).
    revision: a Hub branch, tag or commit. ValueError for anything that does not load (never half-loaded)."""
    folder, hub_repo = Path(os.path.expanduser(os.fspath(source))), None
    if not folder.exists():
        folder, hub_repo = _hub_snapshot(os.fspath(source), revision)
    if not folder.is_dir():
        raise ValueError(f"backbone {source} is a file: make it an export first (python linear_eval.py export --source "
                         f"{source} --output_dir EXPORT), then give the export")
    if (folder / "trainer_state.json").is_file():
        weights, config, config_file = *_read_pretrain_checkpoint(folder), folder / "trainer_state.json"
    else:
        weights, config_file = read_safetensors(folder / "model.safetensors"), folder / "config.json"
        config = read_json(config_file) | ({"hub_repo": hub_repo} if hub_repo else {})
    check_weights(weights, f"the weights of {source}")
    return backbone_from(weights, config, config_file), config


def _read_pretrain_checkpoint(folder):
    """A pretrain.py checkpoint -> (its backbone's weights, the backbone's config that pretrain.py saved with it)."""
    state = read_trainer_state(folder / "trainer_state.json")
    if not isinstance(state.get("backbone"), dict):
        raise ValueError(f"{folder / 'trainer_state.json'} holds no 'backbone' object: not a pretrain.py checkpoint")
    weights = {key.removeprefix("backbone."): value for key, value in
               read_safetensors(folder / "model.safetensors").items() if key.startswith("backbone.")}
    return weights, {**state["backbone"], "epochs_trained": state.get("epochs_trained"), "steps_trained": state.get("step")}


# What a backbone's config says, checked as the flags that set it are (a damaged file fails here, not later).
BACKBONE_SETTINGS = argparse.ArgumentParser(add_help=False)
BACKBONE_SETTINGS.add_argument("--arch", type=str, choices=RESNETS)
BACKBONE_SETTINGS.add_argument("--stem", type=str, choices=list(STEMS))
BACKBONE_SETTINGS.add_argument("--image_size", type=int)
BACKBONE_SETTINGS.add_argument("--eval_resize", type=int)
BACKBONE_SETTINGS.add_argument("--eval_interpolation", type=str, choices=["bilinear", "bicubic"])
BACKBONE_SETTINGS.add_argument("--mean", type=float, nargs=3)
BACKBONE_SETTINGS.add_argument("--std", type=float, nargs=3)
BACKBONE_RANGES = {"image_size": "[1, inf)", "eval_resize": "[1, inf)", "mean": "(-inf, inf)", "std": "(0, inf)"}


def backbone_from(weights, config, where):
    """The backbone that config (arch, stem, image_size, mean, std: an export's config.json, from the file `where`)
    describes, loaded strictly with `weights` (already through `check_weights`); config gains its feature_dim."""
    check_settings(config, BACKBONE_SETTINGS, BACKBONE_RANGES, where)
    if missing := [key for key in ("arch", "stem", "image_size", "mean", "std") if config.get(key) is None]:
        raise ValueError(f"{where} does not say the backbone's {missing[0]}: the file is damaged or was not written "
                         "by this project")
    with torch.device("meta"):  # no random initialisation to overwrite
        backbone = build_backbone(config["arch"], config["stem"])
    expected = backbone.state_dict()
    if problems := weights_mismatch(expected, weights):
        raise ValueError(f"the weights do not fit {config['arch']} with the {config['stem']} stem that {where} "
                         f"says: {problems}")
    # assign: the backbone lives on the meta device; each tensor in its dtype (an fp16 file loads as float32)
    backbone.load_state_dict({k: weights[k].to(v.dtype) for k, v in expected.items()}, assign=True)
    config["feature_dim"] = backbone.feature_dim
    return backbone.eval()


def weights_mismatch(expected, weights):
    """How `weights` differ from a model's state_dict `expected`: the first missing, unexpected and mis-shaped keys."""
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshaped = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    problems = [f"{len(missing)} missing key(s), first {missing[0]!r}"] if missing else []
    problems += [f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}"] if unexpected else []
    if misshaped:
        k = misshaped[0]
        problems.append(f"{len(misshaped)} key(s) of another shape, first {k!r}: "
                        f"{tuple(weights[k].shape)} in the weights, {tuple(expected[k].shape)} in the model")
    return "; ".join(problems)


def write_export(folder, weights, config, card=None):
    """An export folder: model.safetensors (torchvision's keys, no fc.*), config.json (with the conv1 and max-pool
    that rebuild the stem in torchvision) and the model card README.md, renamed into place as one folder."""
    kernel, stride, padding, maxpool = STEMS[config["stem"]]
    config = {**config, "conv1": {"kernel_size": kernel, "stride": stride, "padding": padding}, "maxpool": maxpool}
    with replacing(folder) as tmp:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if card is not None:
            (tmp / "README.md").write_text(card, encoding="utf-8")


def _hub_snapshot(repo_id, revision=None):
    """A Hub model id 'owner/name' -> (its export's folder in huggingface_hub's cache, 'owner/name[@revision]')."""
    if looks_like_path(repo_id) or repo_id.count("/") != 1 or Path(repo_id).suffix in (".safetensors", ".pth", ".tar"):
        raise ValueError(f"backbone {repo_id!r} not found: no such file or folder, nor a Hub id 'owner/name'")
    where = repo_id + (f"@{revision}" if revision else "")
    try:
        files = [huggingface_hub.hf_hub_download(repo_id, name, revision=revision) for name in EXPORT_FILES]
    except huggingface_hub.errors.LocalEntryNotFoundError:  # the Hub's other errors name the repo themselves
        offline = huggingface_hub.constants.HF_HUB_OFFLINE
        reason = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hub could not be reached"
        raise ValueError(f"Hub model {where}: {reason} and the Hub cache ({huggingface_hub.constants.HF_HUB_CACHE}) "
                         "lacks its files: run once with network access, or pass a local export") from None
    return Path(files[0]).parent, where
