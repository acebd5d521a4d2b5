"""The presets, networks, schedules and conversions equal the authors' runs, value by value.

The table below is written from the papers' notes on the authors' training scripts, not from the
project's presets; the reference networks are built here from the authors' description.
"""

import argparse
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageFilter

import intl
import linear_eval
import pretrain
from test_method import ref_intl_loss

F64 = torch.float64
CIFAR10_STATS = (intl.CIFAR_MEAN, intl.CIFAR_STD)
IMAGENET_STATS = (intl.IMAGENET_MEAN, intl.IMAGENET_STD)

# The authors' runs. Keys are this project's flag names; every value is the authors'.
INTL_CIFAR = dict(method="intl", arch="resnet18", stem="cifar", zero_init_residual=False, image_size=32,
                  projector="2048-2048-2048", hidden_bias=False, batch_size=256, epochs=1000, optimizer="sgd", lr=0.3,
                  weight_decay=1e-4, decay_all_params=True, warmup_epochs=2, warmup_steps=None, schedule="cosine",
                  mixed_precision="no", blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.2), jitter=(0.4, 0.4, 0.2, 0.1),
                  grayscale_prob=0.2, crop_interpolation="bicubic", colour_before_crop=False, iters=4, axis=0)
INTL_IMAGENET = dict(INTL_CIFAR, arch="resnet50", stem="imagenet", zero_init_residual=True, image_size=224,
                     projector="8192-8192-8192", batch_size=256, weight_decay=1e-5, decay_all_params=False,
                     mixed_precision="fp16", blur_prob=(1.0, 0.1), solarize_prob=(0.0, 0.2), small_crops=())
INTL_M = dict(INTL_IMAGENET, method="intl-m", momentum=0.996, min_scale=0.2, small_crops=(192, 160, 128, 96),
              blur_prob=(0.5, 0.5), solarize_prob=(0.1, 0.1))
CW_RGP_SMALL = dict(method="cw-rgp", arch="resnet18", stem="cifar-unpadded", zero_init_residual=True, image_size=32,
                    projector="1024-512", hidden_bias=True, num_views=4, groups=4, w_size=64, batch_size=256,
                    epochs=1000, optimizer="adam", lr=3e-3, weight_decay=1e-6, decay_all_params=True,
                    warmup_steps=500, schedule="step", colour_before_crop=True, jitter=(0.4, 0.4, 0.4, 0.1),
                    grayscale_prob=0.1, min_scale=0.2, crop_interpolation="bicubic", blur_prob=(0.0, 0.0),
                    solarize_prob=(0.0, 0.0), mixed_precision="no")
CW_RGP_IMAGENET = dict(CW_RGP_SMALL, arch="resnet50", stem="imagenet", image_size=224, projector="2048-2048-1024",
                       groups=2, w_size=128, batch_size=512, optimizer="sgd", lr=0.05, weight_decay=1e-4,
                       schedule="cosine-epoch", colour_before_crop=False, crop_interpolation="bilinear",
                       grayscale_prob=0.2, blur_prob=(0.5, 0.5), solarize_prob=(0.0, 0.0), mean=IMAGENET_STATS[0],
                       std=IMAGENET_STATS[1])
AUTHORS = {
    "cifar10": dict(INTL_CIFAR, momentum=0.999, mean=CIFAR10_STATS[0], std=CIFAR10_STATS[1]),
    "cifar100": dict(INTL_CIFAR, momentum=0.999, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     eval_mean=CIFAR10_STATS[0], eval_std=CIFAR10_STATS[1]),
    "imagenet100": dict(INTL_IMAGENET, arch="resnet18", zero_init_residual=False, projector="4096-4096-8192",
                        batch_size=128, epochs=400, lr=0.5, weight_decay=2.5e-5),  # fp16: main.py, as every run of it
    "imagenet-800ep": dict(INTL_IMAGENET, epochs=800, lr=0.3),
    "intl-m-100ep": dict(INTL_M, epochs=100, lr=0.5),
    "intl-m-200ep": dict(INTL_M, epochs=200, lr=0.4),
    "intl-m-400ep": dict(INTL_M, epochs=400, lr=0.4),
    "intl-m-800ep": dict(INTL_M, epochs=800, lr=0.3),
    "cw-rgp-cifar10": dict(CW_RGP_SMALL, mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010),
                           eval_std=(0.247, 0.243, 0.261)),  # base/eval: CIFAR-10's std in evaluation
    "cw-rgp-cifar100": dict(CW_RGP_SMALL, mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761)),
    "cw-rgp-stl10": dict(CW_RGP_SMALL, stem="small-maxpool", image_size=64, lr=2e-3, epochs=2000,
                         mean=(0.43, 0.42, 0.39), std=(0.27, 0.26, 0.27), eval_resize=70,
                         eval_interpolation="bicubic"),
    "cw-rgp-tiny-imagenet": dict(CW_RGP_SMALL, stem="small-maxpool", image_size=64, lr=2e-3, epochs=1000,
                                 projector="2048-1024", groups=2, w_size=128, mean=(0.480, 0.448, 0.398),
                                 std=(0.277, 0.269, 0.282)),
    "cw-rgp-imagenet-100ep": dict(CW_RGP_IMAGENET, epochs=100),
    "cw-rgp-imagenet-200ep": dict(CW_RGP_IMAGENET, epochs=200),
}


@pytest.mark.parametrize("preset", sorted(AUTHORS))
def test_every_official_preset_equals_the_authors_run_value_by_value(preset):
    config = vars(pretrain.resolve_config(["--preset", preset, "--print_config"]))
    config["mixed_precision"] = pretrain.PRESETS[preset]["mixed_precision"]  # the recipe's, also on a CPU
    differences = {key: (config[key], want) for key, want in AUTHORS[preset].items()
                   if (tuple(config[key]) if isinstance(config[key], list) else config[key]) != want}
    assert not differences, f"{preset}: (project, authors) {differences}"


def test_every_preset_has_a_row_in_the_authors_table_except_the_digits_demo():
    assert set(pretrain.PRESETS) - set(AUTHORS) == {"digits"}


def test_a_recipe_on_a_cpu_runs_in_float32_and_names_fp16_on_a_gpu():
    assert pretrain.PRESETS["imagenet-800ep"]["mixed_precision"] == "fp16"
    if not torch.cuda.is_available():
        assert pretrain.resolve_config(["--preset", "imagenet-800ep", "--print_config"]).mixed_precision == "no"


# ----------------------------------------------------------------------------- networks


class AuthorsCifarResNet(nn.Module):
    """INTL's CIFAR ResNet-18 as the authors describe it: a 1-pixel zero pad, conv1 3x3 stride 1 padding 1,
    no max-pool. Built from torchvision's blocks so that its keys are torchvision's."""

    def __init__(self, pad=1, maxpool=False):
        super().__init__()
        self.pad = pad
        self.net = torchvision.models.resnet18()
        self.net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        if not maxpool:
            self.net.maxpool = nn.Identity()
        self.net.fc = nn.Identity()

    def forward(self, x):
        return self.net(F.pad(x, (self.pad,) * 4))


def map_sides(backbone, side):
    sides = []
    hooks = [getattr(backbone, name).register_forward_hook(lambda m, i, o: sides.append(o.shape[-1]))
             for name in ("conv1", "layer1", "layer2", "layer3", "layer4")]
    with torch.no_grad():
        backbone.eval()(torch.randn(2, 3, side, side))
    for hook in hooks:
        hook.remove()
    return sides


@pytest.mark.parametrize("stem, side, sides", [("cifar", 32, [34, 34, 17, 9, 5]),
                                               ("cifar-unpadded", 32, [32, 32, 16, 8, 4]),
                                               ("small-maxpool", 64, [64, 32, 16, 8, 4]),
                                               ("imagenet", 224, [112, 56, 28, 14, 7])])
def test_stems_give_the_feature_map_sides_of_the_authors_networks(stem, side, sides):
    assert map_sides(intl.build_backbone("resnet18", stem), side) == sides


@pytest.mark.parametrize("stem", ["cifar", "cifar-unpadded", "small-maxpool"])
def test_a_small_image_stems_conv1_keeps_pytorchs_default_initialisation_as_the_authors_replace_it(stem):
    # Conv2d's default: kaiming_uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 3 x 3 x 3;
    # its std is bound / sqrt(3) = 0.111 (a kaiming_normal fan_out re-initialisation would give 0.059).
    weight = intl.build_backbone("resnet18", stem).conv1.weight.detach()
    bound = 1 / math.sqrt(27)
    assert weight.abs().max() <= bound and weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_cifar_stem_computes_the_authors_padded_network_with_torchvision_keys():
    reference = AuthorsCifarResNet().double().eval()
    backbone = intl.build_backbone("resnet18", "cifar", zero_init_residual=False).double().eval()
    backbone.load_state_dict(reference.net.state_dict())  # strict: the same keys and shapes
    x = torch.randn(3, 3, 8, 8, dtype=F64)  # the pad and the padding act on the border whatever the side
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), reference(x), rtol=1e-10, atol=1e-12)


def authors_projector(in_dim, widths, hidden_bias=False):
    layers, d = [], in_dim
    for width in widths[:-1]:
        layers += [nn.Linear(d, width, bias=hidden_bias), nn.BatchNorm1d(width), nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, widths[-1]))


def test_first_sgd_step_of_the_cifar_recipe_equals_the_authors_network_and_optimiser_in_float64():
    """Per-view passes (own BN statistics), the padded stem, no zero-init, weight decay on every parameter,
    warm-up lr = peak x 1 / warm-up steps at step 0: the parameters after one step agree to 1e-6."""
    config = pretrain.resolve_config(["--preset", "cifar10", "--print_config", "--projector", "64-64-32",
                                      "--batch_size", "16"])  # 16: the official beta 0.01 (log2 16 - 3) > 0
    torch.manual_seed(1)
    model = pretrain.build_model(config).double()
    reference_backbone = AuthorsCifarResNet().double()
    reference_projector = authors_projector(512, [64, 64, 32]).double()
    reference_backbone.net.load_state_dict(model.backbone.state_dict())
    reference_projector.load_state_dict(model.projector.state_dict())
    assert all(torch.all(block.bn2.weight == 1) for block in model.backbone.layer1)  # no zero-init on ResNet-18

    steps_per_epoch, warmup = 10, round(config.warmup_epochs * 10)
    peak = config.lr * config.batch_size / 256
    lr = pretrain.learning_rate(0, config.epochs * steps_per_epoch, warmup, peak, config.schedule, steps_per_epoch)
    assert lr == pytest.approx(peak / warmup)
    views = [torch.randn(16, 3, 4, 4, dtype=F64) for _ in range(2)]  # the stem pads 4 px as it pads 32

    optimizer = pretrain.build_optimizer(config, model)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model(views)["loss"].backward()
    optimizer.step()

    reference = nn.ModuleList([reference_backbone, reference_projector])
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=peak / warmup, momentum=0.9, weight_decay=1e-4)
    embeddings = [reference_projector(reference_backbone(v)) for v in views]  # one pass per view
    ref_intl_loss(embeddings, 4, 0).backward()
    reference_optimizer.step()

    for (name, p), q in zip(model.backbone.named_parameters(), reference_backbone.net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9, msg=name)
    for p, q in zip(model.projector.parameters(), reference_projector.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-9)


def test_every_view_goes_through_encoder_and_projector_alone_with_its_own_batch_statistics():
    model = intl.INTL(intl.build_backbone("resnet18", "cifar"), intl.build_projector(512, "32-16")).double().train()
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    views = [torch.randn(4, 3, 4, 4, dtype=F64) for _ in range(3)]
    with torch.no_grad():
        embeddings = model.embed(views)
        joint = model.projector(model.backbone(torch.cat(views))).split(4)
    assert calls == [4, 4, 4, 12]
    assert not torch.allclose(embeddings[1], joint[1])  # joint BN statistics would change every view's embedding


def test_cw_rgp_runs_the_encoder_per_view_and_the_projector_once_on_all_views():
    backbone, projector = intl.build_backbone("resnet18", "cifar-unpadded"), intl.build_projector(512, "64-32", True)
    model = intl.SubBatchWhitening(backbone, projector, intl.GroupWhitening(groups=2), w_size=4)
    encoder_calls, projector_calls = [], []
    backbone.register_forward_hook(lambda m, i, o: encoder_calls.append(i[0].shape[0]))
    projector.register_forward_hook(lambda m, i, o: projector_calls.append(i[0].shape[0]))
    views = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    with torch.no_grad():
        embeddings = model.embed(views)
        together = projector(torch.cat([backbone(v) for v in views])).split(4)
    assert encoder_calls[:4] == [4, 4, 4, 4] and projector_calls[0] == 16
    for e, t in zip(embeddings, together):
        torch.testing.assert_close(e, t)
    assert projector[0].bias is not None  # CW-RGP's hidden Linear keeps its bias


def test_squared_pair_loss_is_the_mean_over_the_batch_and_channels():
    model = intl.SubBatchWhitening(nn.Flatten(), nn.Identity(), intl.GroupWhitening(groups=1), w_size=4,
                                   normalized=False)
    a, b = torch.randn(4, 6, dtype=F64), torch.randn(4, 6, dtype=F64)
    assert model.pair_loss(a, b).item() == pytest.approx(((a - b) ** 2).sum().item() / 24)


def reference_covariance_penalty(h, axis):
    x = h.double() if axis == 1 else h.double().t()  # columns are the units
    x = x - x.mean(dim=0, keepdim=True)
    cov = x.t() @ x / (x.shape[0] - 1)
    m = cov.shape[0]
    return sum(cov[i, j] ** 2 for i in range(m) for j in range(m) if i != j) / m


@pytest.mark.parametrize("axis", [0, 1])
def test_covariance_penalty_equals_float64_definition_with_gradient(axis):
    h = torch.randn(6, 10, dtype=F64, requires_grad=True)
    h_ref = h.detach().clone().requires_grad_(True)
    value, want = intl.covariance_penalty(h, axis), reference_covariance_penalty(h_ref, axis)
    torch.testing.assert_close(value, want)
    value.backward()
    want.backward()
    torch.testing.assert_close(h.grad, h_ref.grad)


def test_cw_rgp_covariance_term_is_added_per_sub_batch_only_before_its_last_epoch():
    z = [torch.randn(8, 12, dtype=F64) for _ in range(2)]
    plain = intl.SubBatchWhitening(nn.Flatten(), nn.Identity(), intl.GroupWhitening(groups=1), w_size=4).objective(
        z, step=3)["loss"]
    model = intl.SubBatchWhitening(nn.Flatten(), nn.Identity(), intl.GroupWhitening(groups=1), w_size=4,
                                   covariance=(0.01, 2))
    rows = torch.randperm(8, generator=torch.Generator().manual_seed(3)).split(4)
    penalty = sum(sum(reference_covariance_penalty(v[r], 0) for v in z) for r in rows) / len(rows)
    assert model.objective(z, step=3, epoch=1)["loss"].item() == pytest.approx(plain.item() + 0.01 * penalty.item())
    assert model.objective(z, step=3, epoch=2)["loss"].item() == pytest.approx(plain.item())


# ----------------------------------------------------------------------------- official checkpoints


@pytest.mark.parametrize("prefix, stem, reference", [
    ("module.backbone.", None, lambda: AuthorsCifarResNet(pad=1)),  # INTL's CIFAR network
    ("module.model.", "cifar-unpadded", lambda: AuthorsCifarResNet(pad=0)),  # CW-RGP's CIFAR (its stem is asked for)
    ("module.model.", "small-maxpool", lambda: AuthorsCifarResNet(pad=0, maxpool=True)),  # CW-RGP's STL-10 network
])
def test_converted_official_checkpoints_give_the_features_of_the_network_they_came_from(tmp_path, prefix, stem,
                                                                                          reference):
    torch.manual_seed(0)
    network = reference().eval()
    for module in network.modules():  # non-trivial BN statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    state = {prefix + k: v for k, v in network.net.state_dict().items()}
    state[prefix.replace("backbone", "projector").replace("model", "head") + "0.weight"] = torch.randn(8, 512)
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "official.pth.tar")
    export = linear_eval.export_backbone_from(tmp_path / "official.pth.tar", tmp_path / "export", stem=stem)
    backbone, config = intl.load_backbone(export)
    x = torch.randn(2, 3, 16, 16)  # the stems differ at the border and in the max-pool at any side
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), network(x), rtol=1e-5, atol=1e-6)
    assert config["stem"] == (stem or "cifar")
    assert config["conv1"]["padding"] == (2 if config["stem"] == "cifar" else 1)


# ----------------------------------------------------------------------------- schedules


def test_warm_up_starts_at_peak_over_warmup_steps_and_reaches_the_peak_at_its_last_step():
    assert pretrain.learning_rate(0, 1000, 10, 1.0) == pytest.approx(0.1)
    assert pretrain.learning_rate(9, 1000, 10, 1.0) == pytest.approx(1.0)
    # The first step after it is already one step down the cosine: progress (step + 1 - 10) / 990.
    assert pretrain.learning_rate(10, 1000, 10, 1.0) == pytest.approx(0.001 + 0.999 * (1 + math.cos(math.pi / 990)) / 2)


def test_cw_rgp_imagenet_schedule_is_a_per_epoch_cosine_to_zero_after_500_warm_up_steps():
    lr = lambda step: pretrain.learning_rate(step, 100 * 1000, 500, 0.1, "cosine-epoch", 1000)  # noqa: E731
    assert lr(0) == pytest.approx(0.1 / 500) and lr(499) == pytest.approx(0.1)
    assert lr(999) == lr(500) == pytest.approx(0.1)
    assert lr(1000) == lr(1999) == pytest.approx(0.1 * (1 + math.cos(math.pi / 100)) / 2)
    assert lr(99_999) == pytest.approx(0.1 * (1 + math.cos(math.pi * 99 / 100)) / 2)


def test_cw_rgp_small_data_schedule_drops_at_50_and_25_epochs_before_the_end():
    lr = lambda step: pretrain.learning_rate(step, 1000 * 10, 500, 3e-3, "step", 10)  # noqa: E731
    assert lr(499) == pytest.approx(3e-3) and lr(9499) == pytest.approx(3e-3)
    assert lr(9500) == pytest.approx(3e-3 * 0.2) and lr(9750) == pytest.approx(3e-3 * 0.04)


def test_weight_decay_spares_biases_and_bn_only_in_the_imagenet_recipes():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    for preset, decays_all in (("cifar10", True), ("imagenet-800ep", False), ("cw-rgp-imagenet-100ep", True)):
        config = pretrain.resolve_config(["--preset", preset, "--print_config"])
        decayed = [p for g in pretrain.build_optimizer(config, model).param_groups if g["weight_decay"] > 0
                   for p in g["params"]]
        assert len(decayed) == (4 if decays_all else 1), preset


def test_an_explicit_warmup_in_epochs_replaces_a_presets_warmup_in_steps(capsys):
    config = pretrain.resolve_config(["--preset", "cw-rgp-cifar10", "--print_config", "--warmup_epochs", "3"])
    assert config.warmup_steps is None and config.warmup_epochs == 3
    with pytest.raises(SystemExit):
        pretrain.resolve_config(["--print_config", "--warmup_epochs", "3", "--warmup_steps", "5"])
    assert "argument --warmup_steps: not allowed with argument --warmup_epochs" in capsys.readouterr().err


# ----------------------------------------------------------------------------- augmentations


def smooth_image(height=40, width=52, seed=0):
    generator = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    waves = [np.sin(x / generator.uniform(2, 9) + c) * np.cos(y / generator.uniform(2, 9)) for c in range(3)]
    pixels = np.stack(waves, -1) * 90 + 127 + generator.normal(0, 12, (height, width, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def test_cpu_blur_is_pils_gaussian_blur_with_radius_sigma_drawn_in_0_1_to_2():
    image = smooth_image()
    torch.manual_seed(7)
    blurred = pretrain.RandomPILGaussianBlur(1.0)(image)
    torch.manual_seed(7)
    torch.rand(1)
    sigma = torch.empty(1).uniform_(0.1, 2.0).item()
    assert np.array_equal(np.asarray(blurred), np.asarray(image.filter(ImageFilter.GaussianBlur(radius=sigma))))
    assert pretrain.RandomPILGaussianBlur(0.0)(image) is image


def test_cw_rgp_small_data_views_jitter_the_whole_image_before_the_crop():
    config = pretrain.resolve_config(["--preset", "cw-rgp-cifar10", "--print_config"])
    steps = pretrain.augmentation(32, (0.2, 1.0), 0.0, 0.0, config).transforms
    names = [type(t).__name__ for t in steps]
    assert names[:3] == ["RandomApply", "RandomGrayscale", "RandomResizedCrop"]
    jitter = steps[0].transforms[0]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == ((0.6, 1.4), (0.6, 1.4), (0.6, 1.4),
                                                                                  (-0.1, 0.1))
    assert steps[0].p == 0.8 and steps[1].p == 0.1
    assert steps[2].interpolation == torchvision.transforms.InterpolationMode.BICUBIC


def test_cw_rgp_imagenet_views_crop_bilinear_first_and_blur_every_view_half_the_time():
    config = pretrain.resolve_config(["--preset", "cw-rgp-imagenet-100ep", "--print_config"])
    specs = pretrain.view_specs(config)
    assert [(side, scale, blur, solarize) for side, scale, blur, solarize in specs] == [(224, (0.2, 1.0), 0.5, 0.0)] * 4
    steps = pretrain.augmentation(224, (0.2, 1.0), 0.5, 0.0, config).transforms
    assert type(steps[0]).__name__ == "RandomResizedCrop"
    assert steps[0].interpolation == torchvision.transforms.InterpolationMode.BILINEAR


# ----------------------------------------------------------------------------- INTL-M


def test_intl_m_moves_the_target_with_m_of_the_step_before_that_steps_forward(tmp_path):
    """Step 0 moves the target towards the untrained online network (no change); step 1 moves it with m(1)
    towards the network after step 0. An update after each step would use m(0) after step 0."""
    from accelerate.utils import set_seed
    from safetensors.torch import load_file
    from test_pretrain import tiny_args

    generator = torch.Generator().manual_seed(0)
    for i in range(16):
        (tmp_path / "images" / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (8, 8, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "images" / f"class_{i % 2}" / f"{i}.png")
    flags = tiny_args(tmp_path / "images", "--method", "intl-m", "--epochs", 3, "--output_dir", tmp_path / "run")
    pretrain.main(flags + ["--stop_after_steps", "1"])
    pretrain.main(flags + ["--stop_after_steps", "2", "--resume", "latest"])
    config = pretrain.resolve_config(flags + ["--print_config"])
    set_seed(config.seed)
    initial = pretrain.build_model(config).backbone.state_dict()
    after_1, after_2 = (load_file(tmp_path / "run" / "checkpoints" / f"step-{s:08d}" / "model.safetensors")
                        for s in (1, 2))
    total_steps = config.epochs * (16 // config.batch_size)
    m1 = intl.ema_momentum(1, total_steps, config.momentum)
    for name, value in initial.items():
        if value.is_floating_point() and "running" not in name:
            torch.testing.assert_close(after_1[f"target.0.{name}"], value, msg=name)
            want = m1 * value + (1 - m1) * after_1[f"backbone.{name}"]
            torch.testing.assert_close(after_2[f"target.0.{name}"], want, rtol=1e-5, atol=1e-6, msg=name)


def exported_config(flags, tmp_path):
    """The config.json of an export of a checkpoint whose run had these pretrain flags (a tiny projector)."""
    from safetensors.torch import save_file

    config = vars(pretrain.resolve_config([*flags, "--print_config"]))
    model = pretrain.build_model(argparse.Namespace(**{**config, "projector": "16-8", "groups": 2}))
    checkpoint = tmp_path / "checkpoints" / "step-00000001"
    checkpoint.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint / "model.safetensors")
    backbone = pretrain.backbone_config(argparse.Namespace(**config))
    state = {"step": 1, "config": json.loads(json.dumps(config)), "num_processes": 1, "backbone": backbone}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    backbone, config = intl.load_backbone(checkpoint)  # as a finished run exports its backbone
    intl.write_export(tmp_path / "export", backbone.state_dict(), config)
    return intl.load_backbone(tmp_path / "export")[1]


def test_an_export_records_the_stem_and_the_evaluation_input_of_the_recipe(tmp_path):
    """cifar100 pretrains with CIFAR-100's statistics and is evaluated with CIFAR-10's; STL-10 is evaluated on
    Resize(70, bicubic) + CenterCrop(64): what the export tells its users is the evaluation input."""
    exported = exported_config(["--preset", "cifar100", "--eval_resize", "70", "--eval_interpolation", "bicubic"],
                               tmp_path)
    assert exported["stem"] == "cifar" and exported["conv1"] == {"kernel_size": 3, "stride": 1, "padding": 2}
    assert exported["maxpool"] is False
    assert tuple(exported["mean"]) == intl.CIFAR_MEAN and tuple(exported["std"]) == intl.CIFAR_STD
    assert tuple(exported["recipe"]["mean"]) == (0.5071, 0.4865, 0.4409) and exported["eval_resize"] == 70
    resize = intl.eval_transform(64, exported["mean"], exported["std"], exported["eval_resize"],
                                 exported["eval_interpolation"]).transforms[0]
    assert resize.size == [70] and resize.interpolation == torchvision.transforms.InterpolationMode.BICUBIC


@pytest.mark.parametrize("preset, used, unused", [
    ("cw-rgp-cifar10", {"groups", "w_size", "w_eps", "pair_loss"}, {"iters", "beta", "power", "momentum"}),
    ("cifar10", {"iters", "axis", "beta"}, {"groups", "w_size", "w_eps", "power", "momentum", "pair_loss"})])
def test_an_export_records_the_settings_of_its_own_method_only(tmp_path, preset, used, unused):
    exported = exported_config(["--preset", preset], tmp_path)
    assert used <= set(exported["recipe"]) and not unused & (set(exported["recipe"]) | set(exported))
