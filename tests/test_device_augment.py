"""--augment_on device: workers decode, crop and flip; colour jitter, grayscale, blur and solarise run
batched on the device with per-sample parameters, matching torchvision's single-image ops."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as TF

import intl
import pretrain
from test_pretrain import losses

# Float ops on the same float input: only rounding-order differences remain.
ATOL = 1e-5
INTL_JITTER = (0.4, 0.4, 0.2, 0.1)


@pytest.fixture
def images():
    return torch.rand(6, 3, 20, 24)


@pytest.mark.parametrize("ours, reference, low, high", [
    (pretrain.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (pretrain.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (pretrain.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
    (pretrain.adjust_hue, TF.adjust_hue, -0.1, 0.1),
])
def test_each_jitter_op_matches_torchvision_per_image_with_its_own_factor(images, ours, reference, low, high):
    factors = torch.empty(len(images)).uniform_(low, high)
    batched = ours(images, factors)
    for image, factor, out in zip(images, factors, batched):
        torch.testing.assert_close(out, reference(image, factor.item()), atol=ATOL, rtol=0)


def test_grayscale_and_solarise_match_torchvision_and_blur_matches_pil(images):
    torch.testing.assert_close(pretrain.grayscale(images), TF.rgb_to_grayscale(images), atol=ATOL, rtol=0)
    u8 = (images * 255).round().to(torch.uint8)
    sigmas = torch.empty(len(images)).uniform_(0.1, 2.0)
    blurred = pretrain.pil_gaussian_blur(u8.float() / 255, sigmas)
    for image, sigma, out in zip(u8, sigmas, blurred):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(radius=sigma.item()))
        want = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(out, want, atol=1 / 255 + ATOL, rtol=0)
    params = torch.zeros(len(images), pretrain.NUM_PHOTOMETRIC)
    params[:, pretrain.SOLARIZE] = 1
    out = pretrain.photometric(u8, params, (0, 0, 0), (1, 1, 1))
    torch.testing.assert_close(out, TF.solarize(u8, 128).float() / 255, atol=ATOL, rtol=0)


def test_photometric_chain_equals_torchvision_ops_applied_image_by_image_in_each_samples_order():
    torch.manual_seed(1)
    u8 = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    params = torch.stack([pretrain.draw_photometric(INTL_JITTER, 0.2, 0.5, 0.5) for _ in range(32)])
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)
    batched = pretrain.photometric(u8, params, mean, std)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for image, p, out in zip(u8, params, batched):
        x = image.float() / 255
        if p[pretrain.JITTER]:
            for position in range(4):
                op = int(p[pretrain.ORDER + position])
                x = ops[op](x, p[pretrain.BRIGHTNESS + op].item())
        if p[pretrain.GRAY]:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if p[pretrain.BLUR]:  # tested against PIL above
            x = pretrain.pil_gaussian_blur(x[None], p[pretrain.SIGMA:pretrain.SIGMA + 1])[0]
        if p[pretrain.SOLARIZE]:
            x = torch.where(x >= 128 / 255, 1 - x, x)
        torch.testing.assert_close(out, TF.normalize(x, mean, std), atol=1e-4, rtol=0)
    assert batched.dtype == torch.float32


def test_photometric_keeps_values_in_range_before_normalisation():
    u8 = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8)
    params = torch.stack([pretrain.draw_photometric(INTL_JITTER, 0.2, 1.0, 0.5) for _ in range(64)])
    out = pretrain.photometric(u8, params, (0, 0, 0), (1, 1, 1))
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1


@pytest.mark.slow
def test_probabilities_and_ranges_of_the_drawn_parameters_match_the_recipe():
    torch.manual_seed(0)
    n = 20_000
    params = torch.stack([pretrain.draw_photometric(INTL_JITTER, 0.2, 0.5, 0.2) for _ in range(n)])
    # 5 standard deviations of a rate over 20k draws is at most 0.018: a probability off by 0.05
    # (say 0.75 instead of 0.8 for the jitter) fails.
    for column, p in ((pretrain.JITTER, 0.8), (pretrain.GRAY, 0.2), (pretrain.BLUR, 0.5), (pretrain.SOLARIZE, 0.2)):
        tolerance = 5 * math.sqrt(p * (1 - p) / n)
        assert abs(params[:, column].mean().item() - p) < tolerance, column
    for column, low, high in ((pretrain.BRIGHTNESS, 0.6, 1.4), (pretrain.CONTRAST, 0.6, 1.4),
                              (pretrain.SATURATION, 0.8, 1.2), (pretrain.HUE, -0.1, 0.1), (pretrain.SIGMA, 0.1, 2.0)):
        values = params[:, column]
        assert low <= values.min() and values.max() <= high
        assert abs(values.mean().item() - (low + high) / 2) < 0.02 * (high - low)
    orders = params[:, pretrain.ORDER:pretrain.ORDER + 4]
    assert (orders.sort(dim=1).values == torch.arange(4.0)).all()
    assert len({tuple(o.tolist()) for o in orders}) == 24  # every order occurs


def test_cropped_views_differ_per_sample_and_replay_from_seed_epoch_and_index(digits_split):
    config = pretrain.resolve_config(["--print_config", "--image_size", "16", "--num_views", "2"])
    data = pretrain.CroppedViews(digits_split("train"), pretrain.view_specs(config), seed=0)
    crops, params, label = data[(0, 5)]
    again = data[(0, 5)]
    assert [c.shape for c in crops] == [(3, 16, 16)] * 2 and all(c.dtype == torch.uint8 for c in crops)
    assert all(torch.equal(a, b) for a, b in zip(crops + params, again[0] + again[1]))
    others = [data[(0, i)][1][0] for i in range(6, 12)]
    assert len({tuple(p.tolist()) for p in others}) == len(others)
    assert not torch.equal(data[(1, 5)][0][0], crops[0])


def test_reduced_size_jpeg_decoding_is_visually_equivalent_to_full_decoding(tmp_path):
    """A 500 x 375 JPEG cropped to 32 px: draft decoding (1/8 size) against a full decode, PSNR > 30 dB."""
    y, x = np.mgrid[0:375, 0:500]
    pixels = np.stack([127 + 100 * np.sin(x / 23.0), 127 + 100 * np.cos(y / 17.0), (x + y) % 256], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    full = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    handle = Image.open(io.BytesIO(buffer.getvalue()))
    handle.draft("RGB", (500 // 8, 375 // 8))
    reduced = handle.convert("RGB")
    assert reduced.width < 500
    small = reduced.resize((32, 32), Image.Resampling.BICUBIC)
    mse = np.mean((np.asarray(full, dtype=np.float64) - np.asarray(small, dtype=np.float64)) ** 2)
    assert 10 * math.log10(255 ** 2 / mse) > 30


def test_draft_decoded_jpegs_of_odd_size_give_every_crop_inside_the_image(tmp_path, monkeypatch):
    """1001 x 750 decodes at half size to 501 x 375: the two axes shrink by different factors."""
    y, x = np.mgrid[0:750, 0:1001]
    (tmp_path / "a").mkdir()
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(tmp_path / "a" / "odd.jpg")
    config = pretrain.resolve_config(["--print_config", "--image_size", "32", "--min_scale", "0.9"])
    data = pretrain.CroppedViews(intl.load_image_split(str(tmp_path), "train"), pretrain.view_specs(config), seed=0)
    decoded_widths, decode = [], intl.ImageDataset.__getitem__

    def recording_decode(self, index, before_decode=None):
        image, label = decode(self, index, before_decode)
        decoded_widths.append(image.width)
        return image, label

    monkeypatch.setattr(intl.ImageDataset, "__getitem__", recording_decode)
    for epoch in range(200):
        crops, _, _ = data[(epoch, 0)]
        assert [c.shape for c in crops] == [(3, 32, 32)] * 2
    assert max(decoded_widths) < 1001  # every decode was a reduced one


@pytest.mark.slow
def test_pretraining_runs_end_to_end_with_the_device_path_and_resumes_exactly(tmp_path):
    generator = torch.Generator().manual_seed(0)
    for i in range(32):  # 4 steps of 8 images per epoch
        (tmp_path / "images" / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (20, 20, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "images" / f"class_{i % 2}" / f"{i}.png")
    flags = ["--dataset", str(tmp_path / "images"), "--image_size", "16", "--batch_size", "8", "--projector",
             "32-32-32", "--arch", "resnet18", "--num_workers", "0", "--knn_every", "0", "--log_every", "1",
             "--spectrum_every", "4", "--epochs", "2"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    pretrain.main(["--output_dir", whole, *flags, "--augment_on", "device"])
    pretrain.main(["--output_dir", parts, *flags, "--augment_on", "device", "--stop_after_steps", "3"])
    pretrain.main(["--output_dir", parts, "--resume", "latest", *flags])
    expected, resumed = losses(tmp_path / "whole"), losses(tmp_path / "parts")
    assert sorted(expected) == list(range(1, 9))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step


def test_device_path_makes_the_multi_crop_views_of_the_intl_m_recipe(digits_split):
    config = pretrain.resolve_config(["--preset", "intl-m-100ep", "--print_config"])
    data = pretrain.CroppedViews(digits_split("train"), pretrain.view_specs(config), seed=0)
    crops, params, _ = data[(0, 3)]
    assert [c.shape[-1] for c in crops] == [224, 224, 192, 160, 128, 96]
    views = pretrain.device_views([c[None] for c in crops], [p[None] for p in params], config, "cpu")
    assert [v.shape for v in views] == [(1, 3, s, s) for s in (224, 224, 192, 160, 128, 96)]
