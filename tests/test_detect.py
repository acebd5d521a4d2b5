"""detect_transfer.py: model builders, the VOC and COCO evaluators on hand-built cases, generated VOC / COCO
datasets, learning on synthetic shapes, schedule / weight decay / precise BN, resume, evaluation-only, bad input."""

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torchvision.models.detection.anchor_utils import AnchorGenerator

import detect_transfer as dt
import intl
import linear_eval
from conftest import write_export

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("aeroplane", "bicycle")  # VOC's classes 1 and 2: a red rectangle and a blue disk

# Reduced settings: 96 px images (with ResNet-18 C4: 256-channel res4, in VOC_ARGS and tiny_config).
SMALL = ["--train_sizes", "96", "--test_size", "96", "--max_size", "160", "--num_workers", "0", "--precise_bn", "4",
         "--log_every", "5"]
BUILD_DETECTOR = dt.build_detector  # Detectron2's C4 sizes


def small_detector(config, backbone, num_classes):
    """build_detector with Detectron2's C4 sizes scaled down to 64-96 px images: anchors 16..256, 200 proposals per
    image before NMS and 20 after, 64 anchors and 16 RoIs sampled per image for the losses, 4 x 4 RoIs."""
    model = BUILD_DETECTOR(config, backbone, num_classes)
    model.rpn.anchor_generator = AnchorGenerator(((16, 32, 64, 128, 256),), ((0.5, 1.0, 2.0),))  # 15 per place
    model.rpn._pre_nms_top_n, model.rpn._post_nms_top_n = dict(training=200, testing=200), dict(training=20, testing=20)
    model.rpn.fg_bg_sampler.batch_size_per_image = 64
    model.roi_heads.fg_bg_sampler.batch_size_per_image = 16
    model.roi_heads.box_roi_pool.output_size = 4  # also the mask branch's pooler
    return model


@pytest.fixture(scope="module", autouse=True)
def _small_detector():
    """Every detector the script builds in these tests is small_detector (BUILD_DETECTOR: Detectron2's sizes)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dt, "build_detector", small_detector)
        yield


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: on 2 shared cores it runs these small convolutions ~3x faster than two (measured)."""
    torch.set_num_threads(1)
    yield


# ----------------------------------------------------------------------------- synthetic data on disk


def draw_scene(generator, size=96, max_objects=2):
    """A noisy grey image with 1..max_objects shapes: class 1 a red rectangle, class 2 a blue disk.
    Returns the image and [(label, x1, y1, x2, y2)] with the shape covering pixels x1..x2-1, y1..y2-1."""
    pixels = torch.randint(80, 170, (size, size, 3), generator=generator, dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(int(torch.randint(1, max_objects + 1, (1,), generator=generator))):
        label = int(torch.randint(1, 3, (1,), generator=generator))
        w, h = (int(v) for v in torch.randint(20, 44, (2,), generator=generator))
        x1, y1 = int(torch.randint(0, size - w, (1,), generator=generator)), int(torch.randint(0, size - h, (1,), generator=generator))
        if label == 1:
            draw.rectangle([x1, y1, x1 + w - 1, y1 + h - 1], fill=(220, 30, 30))
        else:
            draw.ellipse([x1, y1, x1 + w - 1, y1 + h - 1], fill=(30, 30, 220))
        objects.append((label, x1, y1, x1 + w, y1 + h))
    return image, objects


def write_voc(root, n_trainval=48, n_test=16, seed=0, size=96, difficult_every=0):
    """ROOT/VOCdevkit/VOC2007 with JPEGImages, Annotations (1-based inclusive boxes) and ImageSets/Main."""
    base = Path(root) / "VOCdevkit" / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    names = {"trainval": [], "test": []}
    count = 0
    for split, n in (("trainval", n_trainval), ("test", n_test)):
        for i in range(n):
            name = f"{split}_{i:04d}"
            image, objects = draw_scene(generator, size)
            image.save(base / "JPEGImages" / f"{name}.jpg", quality=95)
            xml = [f"<annotation><filename>{name}.jpg</filename><size><width>{size}</width><height>{size}</height>"
                   "<depth>3</depth></size>"]
            for label, x1, y1, x2, y2 in objects:
                count += 1
                difficult = int(difficult_every > 0 and count % difficult_every == 0)
                xml.append(f"<object><name>{SHAPES[label - 1]}</name><difficult>{difficult}</difficult><bndbox>"
                           f"<xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
            (base / "Annotations" / f"{name}.xml").write_text("".join(xml) + "</annotation>")
            names[split].append(name)
    for split, listed in names.items():
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(listed) + "\n")
    return Path(root)


def write_coco(root, n_train=12, n_val=6, seed=0, size=96, crowd_in_first=True, empty_image=True):
    """ROOT/annotations/instances_{train,val}2017.json + ROOT/{train,val}2017/*.jpg with polygon segmentations.

    Category ids are not contiguous (3 and 7); the first training image also has a crowd box, and the last
    training image has no object at all.
    """
    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    category_ids = {1: 3, 2: 7}
    ann_id = 0
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            image_id = 100 + i
            image, objects = draw_scene(generator, size)
            if empty_image and split == "train2017" and i == n - 1:
                image, objects = Image.fromarray(np.full((size, size, 3), 128, np.uint8)), []
            image.save(root / split / f"{image_id:012d}.jpg", quality=95)
            images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": size, "height": size})
            for label, x1, y1, x2, y2 in objects:
                ann_id += 1
                polygon = [x1, y1, x2, y1, x2, y2, x1, y2]
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_ids[label],
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                    "segmentation": [polygon], "iscrowd": 0})
            if crowd_in_first and i == 0:
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": 3, "bbox": [0, 0, 10, 10],
                                    "area": 100, "segmentation": {"counts": [0, 100, size * size - 100],
                                                                  "size": [size, size]}, "iscrowd": 1})
        categories = [{"id": 3, "name": "rectangle"}, {"id": 7, "name": "disk"}]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def make_config(*args):
    """A resolved configuration (the per-architecture defaults filled in), for building models directly."""
    config = dt.resolve_config(["--print_config", *map(str, args)])
    if config.backbone is None:  # built from a bare ResNet: no export says the normalisation
        config.mean, config.std = list(intl.IMAGENET_MEAN), list(intl.IMAGENET_STD)
    return config


def with_backbone(config):
    """(the configuration with the backbone's arch and input normalisation, the backbone), as main builds them."""
    backbone, config = dt.load_detection_backbone(config)
    return config, backbone


def tiny_config(model="faster-c4", *args):
    return make_config("--model", model, "--arch", "resnet18", "--train_sizes", 64, "--test_size", 64, "--max_size", 128,
                       *args)


def scene_batch(masks=False, sizes=((60, 80), (64, 48))):
    """Two images with boxes (and masks filling the boxes)."""
    images = [torch.rand(3, h, w) for h, w in sizes]
    targets = [{"boxes": torch.tensor([[5.0, 6, 40, 50], [30, 10, 70, 40]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[8.0, 4, 40, 30]]), "labels": torch.tensor([2])}]
    for image, t in zip(images, targets):
        t["boxes"][:, 0::2].clamp_(max=image.shape[2])
        t["boxes"][:, 1::2].clamp_(max=image.shape[1])
        if masks:
            t["masks"] = torch.zeros(len(t["boxes"]), *image.shape[1:], dtype=torch.uint8)
            for m, (x1, y1, x2, y2) in zip(t["masks"], t["boxes"].int().tolist()):
                m[y1:y2, x1:x2] = 1
    return images, targets


@pytest.fixture(scope="module")
def r50_export(tmp_path_factory):
    """A random torchvision ResNet-50 written as an export folder (what pretrain.py writes)."""
    export = tmp_path_factory.mktemp("r50") / "backbone"
    weights = {k: v for k, v in torchvision.models.resnet50().state_dict().items() if not k.startswith("fc.")}
    write_export(export, weights, {"arch": "resnet50"})
    return export


# ----------------------------------------------------------------------------- model builders


def test_r50_c4_is_res2_to_res4_then_res5_with_one_extra_batchnorm_and_detectron2_heads(r50_export):
    config = make_config("--model", "faster-c4", "--backbone", r50_export)
    model = BUILD_DETECTOR(*with_backbone(config), num_classes=20)
    weights = load_file(r50_export / "model.safetensors")

    # Every backbone weight is the export's, under torchvision's names; res5 sits in the box head.
    state = model.state_dict()
    for key, value in weights.items():
        where = f"roi_heads.box_head.{key}" if key.startswith("layer4.") else f"backbone.{key}"
        assert torch.equal(state[where], value), where
    # Parameter count: the ResNet without fc + RPN (3x3 conv, 15 anchors) + the extra BN + the box predictor.
    resnet = sum(v.numel() for k, v in weights.items() if "running" not in k and "num_batches" not in k)
    rpn = (1024 * 1024 * 9 + 1024) + (1024 * 15 + 15) + (1024 * 60 + 60)
    predictor = (2048 * 21 + 21) + (2048 * 84 + 84)
    assert sum(p.numel() for p in model.parameters()) == resnet + rpn + 2 * 2048 + predictor
    assert all(p.requires_grad for p in model.parameters())  # every layer fine-tuned
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 53 + 1 and not any(isinstance(m, torchvision.ops.FrozenBatchNorm2d) for m in model.modules())
    assert isinstance(model.roi_heads.box_head.norm, nn.BatchNorm2d) and model.roi_heads.box_head.norm.num_features == 2048

    assert model.rpn.anchor_generator.num_anchors_per_location() == [15]
    assert model.rpn._pre_nms_top_n == {"training": 12000, "testing": 6000}
    assert model.rpn._post_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.rpn.fg_bg_sampler.batch_size_per_image == 256
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 512
    assert model.roi_heads.score_thresh == 0.05 and model.roi_heads.detections_per_img == 100
    pooler = model.roi_heads.box_roi_pool  # Detectron2's ROIAlignV2
    assert isinstance(pooler, torchvision.ops.RoIAlign) and pooler.output_size == 14 and pooler.aligned
    assert pooler.spatial_scale == 1 / 16 and pooler.sampling_ratio == 0
    with torch.no_grad():
        assert model.backbone(torch.zeros(1, 3, 64, 96)).shape == (1, 1024, 4, 6)  # stride 16
        assert model.roi_heads.box_head(torch.zeros(2, 1024, 14, 14)).shape == (2, 2048, 7, 7)
    predictor = model.roi_heads.box_predictor
    assert abs(predictor.cls_score.weight.std().item() - 0.01) < 0.001
    assert abs(predictor.bbox_pred.weight.std().item() - 0.001) < 0.0001
    assert not predictor.cls_score.bias.any() and not predictor.bbox_pred.bias.any()
    assert model.transform.image_mean == list(intl.IMAGENET_MEAN) and model.transform.test_size == 800
    assert model.transform.min_size == tuple(range(480, 801, 32))


def test_mask_c4_predicts_masks_from_res5_with_a_deconvolution(r50_export):
    config = make_config("--model", "mask-c4", "--backbone", r50_export)
    model = BUILD_DETECTOR(*with_backbone(config), num_classes=80)
    heads = model.roi_heads
    assert heads.has_mask() and heads.mask_roi_pool is heads.box_roi_pool
    assert heads.mask_predictor.conv5_mask.in_channels == 2048 and heads.mask_predictor.conv5_mask.stride == (2, 2)
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 81
    assert abs(heads.mask_predictor.mask_fcn_logits.weight.std().item() - 0.001) < 0.0002


def test_backbone_loads_strictly_and_refuses_what_does_not_fit(tmp_path):
    weights = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    good = tmp_path / "good"
    write_export(good, weights, {"arch": "resnet18", "mean": [0.5, 0.4, 0.3],
                                      "std": [0.2, 0.2, 0.2]})
    official = tmp_path / "official.pth.tar"  # read through its export
    torch.save({"state_dict": {f"module.backbone.{k}": v for k, v in weights.items()}}, official)
    official = linear_eval.export_backbone_from(official, tmp_path / "official")
    for source in (good, official):
        config = tiny_config("faster-c4", "--backbone", source)
        model = dt.build_detector(*with_backbone(config), 2)
        assert torch.equal(model.backbone.layer3[1].conv2.weight, weights["layer3.1.conv2.weight"])
        assert torch.equal(model.roi_heads.box_head.layer4[0].bn1.running_var, weights["layer4.0.bn1.running_var"])
        assert model.transform.image_mean == ([0.5, 0.4, 0.3] if source == good else list(intl.IMAGENET_MEAN))

    extra = tmp_path / "extra"
    write_export(extra, {**weights, "fc.weight": torch.zeros(3, 512), "head.bias": torch.zeros(3)},
                      {"arch": "resnet18"})
    with pytest.raises(ValueError, match="unexpected"):
        dt.load_detection_backbone(tiny_config("faster-c4", "--backbone", extra))
    missing = tmp_path / "missing"
    write_export(missing, {k: v for k, v in weights.items() if k != "layer2.0.conv1.weight"},
                      {"arch": "resnet18"})
    with pytest.raises(ValueError, match="missing"):
        dt.load_detection_backbone(tiny_config("faster-c4", "--backbone", missing))
    cifar = tmp_path / "cifar"
    write_export(cifar, intl.build_backbone("resnet18", "cifar").state_dict(),
                      {"arch": "resnet18", "stem": "cifar"})
    with pytest.raises(ValueError, match="cifar stem"):
        dt.load_detection_backbone(tiny_config("faster-c4", "--backbone", cifar))


@pytest.mark.parametrize("stem", ["cifar-unpadded", "small-maxpool"])
def test_an_exported_official_cw_rgp_small_data_checkpoint_is_refused_naming_its_stem(tmp_path, stem):
    """CW-RGP's small-data checkpoints (base/train.py: the encoder under model.module.*) have a 3x3 conv1; their
    export says which small-image stem, and detection refuses it in one line, without asking for a flag."""
    state_dict = {f"model.module.{k}": v for k, v in intl.build_backbone("resnet18", stem).state_dict().items()}
    state_dict["head.0.weight"] = torch.randn(1024, 512)
    checkpoint = tmp_path / "cw_rgp.pth.tar"
    torch.save({"epoch": 1000, "arch": "resnet18", "state_dict": state_dict}, checkpoint)
    export = linear_eval.export_backbone_from(checkpoint, tmp_path / "export", stem=stem)
    with pytest.raises(ValueError, match=f"has a {stem} stem .*does not fit the detectors") as refused:
        dt.load_detection_backbone(tiny_config("faster-c4", "--backbone", export))
    assert "--stem" not in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("model_name", dt.MODELS)
def test_a_training_step_gives_finite_losses_and_evaluation_gives_boxes_in_original_pixels(model_name):
    # 5 proposals per test image (small_detector: 20): the untrained heads keep nearly every proposal for both classes,
    # and the mask heads run on each detection.
    config = tiny_config(model_name)
    torch.manual_seed(0)
    model = dt.build_detector(config, intl.build_backbone("resnet18", "imagenet", zero_init_residual=False), 2)
    model.rpn._post_nms_top_n["testing"] = 5
    masks = model_name.startswith("mask")
    images, targets = scene_batch(masks)
    model.train()
    losses = model(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} | ({"loss_mask"} if masks else set())
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())  # every layer trained
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        h, w = image.shape[1:]
        assert out["boxes"].shape[1] == 4 and 0 < len(out["boxes"]) <= 100
        assert out["boxes"][:, 0::2].max() <= w and out["boxes"][:, 1::2].max() <= h
        assert set(out["labels"].tolist()) <= {1, 2} and (out["scores"] > 0.05).all()
        if masks:
            assert out["masks"].shape == (len(out["boxes"]), 1, h, w)


def test_images_are_resized_to_a_drawn_training_size_or_the_test_size_with_the_long_side_capped():
    transform = dt.DetectionTransform([32, 48], 40, 60, intl.IMAGENET_MEAN, intl.IMAGENET_STD)
    image, target = torch.rand(3, 20, 40), {"boxes": torch.tensor([[2.0, 4, 10, 20]]),
                                             "masks": torch.ones(1, 20, 40, dtype=torch.uint8)}
    sides = set()
    for _ in range(20):
        resized, out = transform.train().resize(image, {k: v.clone() for k, v in target.items()})
        sides.add(resized.shape[1])
        scale = resized.shape[1] / 20
        assert torch.allclose(out["boxes"], target["boxes"] * scale) and out["masks"].shape[1:] == resized.shape[1:]
    assert sides == {30}  # 32 and 48 would make the long side 64 and 96 > 60: capped at 60 x 30
    transform.max_size = 1000
    assert {transform.resize(image)[0].shape[1] for _ in range(20)} == {32, 48}
    assert transform.eval().resize(image)[0].shape[1:] == (40, 80)


def test_mask_c4_runs_res5_once_per_sampled_roi_in_training():
    config = tiny_config("mask-c4")
    model = dt.build_detector(config, intl.build_backbone("resnet18", "imagenet", zero_init_residual=False), 2).train()
    calls = []
    model.roi_heads.box_head.layer4.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    images, targets = scene_batch(masks=True)
    losses = model(images, targets)
    assert "loss_mask" in losses and len(calls) == 1
    assert calls[0] == 2 * 16  # RoIs sampled per image x images: the foreground ones are not run again


# ----------------------------------------------------------------------------- the VOC evaluator on hand-built cases
# Boxes in the devkit's inclusive pixel coordinates: [1, 1, 10, 10] is 10 x 10 pixels.


def gt(*boxes, difficult=None):
    boxes = np.array(boxes, float).reshape(-1, 4)
    return boxes, np.array(difficult if difficult is not None else [False] * len(boxes))


def test_voc_perfect_detections_give_ap_1():
    ground_truth = {0: gt([1, 1, 10, 10], [20, 20, 40, 35]), 1: gt([5, 5, 50, 50])}
    detections = [(0, 0.9, [1, 1, 10, 10]), (0, 0.8, [20, 20, 40, 35]), (1, 0.7, [5, 5, 50, 50])]
    for threshold in dt.IOU_THRESHOLDS:
        assert dt.voc_class_ap(detections, ground_truth, threshold) == pytest.approx(1.0)


def test_voc_duplicate_detection_is_a_false_positive():
    ground_truth = {0: gt([1, 1, 10, 10], [20, 20, 40, 40])}
    detections = [(0, 0.9, [1, 1, 10, 10]), (0, 0.8, [1, 1, 10, 10]), (0, 0.7, [20, 20, 40, 40])]
    # TP, FP, TP: precision 1 up to recall 0.5, then 2/3 at recall 1.
    assert dt.voc_class_ap(detections, ground_truth, 0.5) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)


def test_voc_missed_object_caps_recall_and_unmatched_detections_are_false_positives():
    ground_truth = {0: gt([1, 1, 10, 10], [20, 20, 40, 40]), 1: gt()}
    detections = [(0, 0.9, [1, 1, 10, 10]), (1, 0.95, [1, 1, 10, 10])]  # the second image has no object
    # FP then TP: recall 0.5 at precision 1/2.
    assert dt.voc_class_ap(detections, ground_truth, 0.5) == pytest.approx(6 * 0.5 / 11)
    assert dt.voc_class_ap([], ground_truth, 0.5) == 0.0
    assert math.isnan(dt.voc_class_ap(detections, {0: gt()}, 0.5))  # no object of the class: undefined


def test_voc_difficult_objects_neither_count_towards_recall_nor_penalise_detections():
    ground_truth = {0: gt([1, 1, 10, 10], [20, 20, 40, 40], difficult=[False, True])}
    on_difficult = (0, 0.95, [20, 20, 40, 40])
    on_normal = (0, 0.9, [1, 1, 10, 10])
    assert dt.voc_class_ap([on_difficult, on_normal], ground_truth, 0.5) == pytest.approx(1.0)  # ignored, not FP
    assert dt.voc_class_ap([on_normal], ground_truth, 0.5) == pytest.approx(1.0)  # not missed
    not_difficult = {0: gt([1, 1, 10, 10], [20, 20, 40, 40])}
    assert dt.voc_class_ap([on_normal], not_difficult, 0.5) == pytest.approx(6 / 11)


def test_voc_iou_exactly_at_the_threshold_is_not_a_match():
    ground_truth = {0: gt([1, 1, 10, 10])}  # 100 pixels
    half = (0, 0.9, [1, 1, 10, 5])  # 50 pixels inside: IoU exactly 0.5 with the +1 convention
    assert dt.voc_class_ap([half], ground_truth, 0.5) == 0.0
    assert dt.voc_class_ap([half], ground_truth, 0.45) == pytest.approx(1.0)
    assert dt.voc_class_ap([(0, 0.9, [1, 1, 10, 6])], ground_truth, 0.5) == pytest.approx(1.0)  # IoU 0.6


def test_voc_evaluate_averages_ten_iou_thresholds_in_devkit_coordinates():
    # Records hold 0-based boxes (the XML's x1, y1 minus 1); [0, 0, 10, 10] is the devkit's [1, 1, 10, 10].
    records = [{"boxes": np.array([[0, 0, 10, 10]], np.float32), "labels": np.array([1]), "difficult": np.array([False])},
               {"boxes": np.array([[0, 0, 20, 20]], np.float32), "labels": np.array([2]), "difficult": np.array([False])}]
    predictions = [{"index": 0, "boxes": np.array([[0, 0, 10, 7]], np.float32), "scores": np.array([0.9]),
                    "labels": np.array([1])},  # devkit IoU 70 / 100 = 0.7: matched at 0.50..0.65, not at 0.70 on
                   {"index": 1, "boxes": np.array([[0, 0, 20, 20]], np.float32), "scores": np.array([0.8]),
                    "labels": np.array([2])}]
    result = dt.voc_evaluate(predictions, records, ("a", "b", "c"))
    assert result["per_class_AP50"] == {"a": pytest.approx(100), "b": pytest.approx(100)}
    assert result["AP50"] == pytest.approx(100) and result["AP75"] == pytest.approx(50)
    assert result["AP"] == pytest.approx((40 + 100) / 2)


def test_voc_scores_and_corners_are_rounded_as_the_evaluator_writes_its_detection_files():
    # Detectron2 writes "{score:.3f} {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}" (devkit coordinates) and re-reads it.
    def record(*boxes):
        boxes = np.array(boxes, np.float32).reshape(-1, 4)
        return {"boxes": boxes, "labels": np.ones(len(boxes), int), "difficult": np.zeros(len(boxes), bool)}

    def prediction(index, score, box):
        return {"index": index, "boxes": np.array([box], np.float32), "scores": np.array([score], np.float32),
                "labels": np.array([1])}

    # Corners: y2 = 5.04 gives devkit IoU 50.4 / 100 > 0.5, a match; written as 5.0 the IoU is exactly 0.5: none.
    result = dt.voc_evaluate([prediction(0, 0.9, [0, 0, 10, 5.04])], [record([0, 0, 10, 10])], ("a",))
    assert result["AP50"] == 0.0
    # Scores: a false positive at 0.8004 ranks before the true positive at 0.8001 (11-point AP 0.5), but both are
    # written as 0.800 and the tie keeps the written order, image 0 first: the true positive, AP 1.
    records = [record([0, 0, 10, 10]), record()]
    predictions = [prediction(0, 0.8001, [0, 0, 10, 10]), prediction(1, 0.8004, [0, 0, 10, 10])]
    assert dt.voc_evaluate(predictions, records, ("a",))["AP50"] == pytest.approx(100)
    [(score, box)] = dt.as_written_to_detection_files(np.array([0.8004], np.float32),
                                                      np.array([[0.26, 0, 9.96, 5.04]], np.float32))
    assert score == 0.8 and box.tolist() == [1.3, 1.0, 10.0, 5.0]  # x1, y1 + 1 (devkit), then rounded


# ----------------------------------------------------------------------------- generated datasets and COCO evaluation


def test_generated_voc_loads_through_torchvision_with_shifted_boxes_and_difficult_flags(tmp_path):
    root = write_voc(tmp_path, n_trainval=6, n_test=3, difficult_every=2)
    dataset = torchvision.datasets.VOCDetection(root, year="2007", image_set="trainval")
    image, target = dataset[0]
    assert image.size == (96, 96) and target["annotation"]["object"][0]["name"] in SHAPES
    records = dt.voc_records(root, "2007-trainval")
    assert len(records) == 6
    for record, xml in zip(records, dataset.annotations):
        objects = dataset.parse_voc_xml(ET.parse(xml).getroot())["annotation"]["object"]
        raw = np.array([[float(o["bndbox"][k]) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objects])
        assert np.array_equal(record["boxes"], raw - [1, 1, 0, 0])
        assert record["labels"].tolist() == [SHAPES.index(o["name"]) + 1 for o in objects]
        assert record["difficult"].tolist() == [o["difficult"] == "1" for o in objects]
    assert any(r["difficult"].any() for r in records)
    with pytest.raises(ValueError, match=r"VOCdevkit/VOC2012/JPEGImages"):
        dt.voc_records(root, "2012-trainval")


def test_generated_coco_loads_with_contiguous_labels_no_crowd_and_no_empty_training_image(tmp_path):
    root = write_coco(tmp_path, n_train=5, n_val=3)
    dataset = torchvision.datasets.CocoDetection(root / "train2017", str(root / "annotations" / "instances_train2017.json"))
    _, annotations = dataset[0]
    assert any(a["iscrowd"] for a in annotations)
    data = dt.coco_data(str(root / "annotations" / "instances_train2017.json"), str(root / "train2017"), masks=True)
    assert data["category_ids"] == [3, 7] and data["classes"] == ["rectangle", "disk"]
    first = data["records"][0]
    non_crowd = [a for a in annotations if not a["iscrowd"]]
    assert len(first["boxes"]) == len(non_crowd)  # the crowd box is left out
    assert first["labels"].tolist() == [{3: 1, 7: 2}[a["category_id"]] for a in non_crowd]
    x, y, w, h = non_crowd[0]["bbox"]
    assert first["boxes"][0].tolist() == [x, y, x + w, y + h]
    masks = dt.decode_masks(first["masks"])
    assert masks.shape == (len(non_crowd), 96, 96) and masks[0, int(y) + 1, int(x) + 1] == 1 and masks[0].sum() > 0
    assert len(data["records"][-1]["boxes"]) == 0
    config = dt.get_parser().parse_args(["--dataset", "coco", "--data_root", str(root), "--model", "mask-c4"])
    assert len(dt.load_split(config, "train")["records"]) == 4  # the empty image is not trained on
    with pytest.raises(ValueError, match="annotations/instances_train2017.json"):
        dt.coco_data(str(tmp_path / "nowhere.json"), str(root / "train2017"), masks=False)


def test_coco_evaluation_agrees_with_cocoeval_on_the_same_predictions(tmp_path):
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    root = write_coco(tmp_path, n_train=1, n_val=6)
    data = dt.coco_data(str(root / "annotations" / "instances_val2017.json"), str(root / "val2017"), masks=True)
    generator = np.random.default_rng(0)
    predictions, direct = [], {"bbox": [], "segm": []}
    for index, record in enumerate(data["records"]):
        boxes = record["boxes"] + generator.uniform(-3, 3, record["boxes"].shape).astype(np.float32)
        boxes = np.concatenate([boxes, [[10, 10, 40, 40]]]).astype(np.float32)  # a false positive too
        labels = np.concatenate([record["labels"], [1]])
        scores = generator.uniform(0.1, 1, len(boxes))
        masks = torch.zeros(len(boxes), 96, 96, dtype=torch.bool)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.round().astype(int).clip(0, 96)):
            m[y1:y2, x1:x2] = True
        rles = dt.encode_masks(masks)
        predictions.append({"index": index, "boxes": boxes, "scores": scores, "labels": labels, "masks": rles})
        for d, (box, score, label) in enumerate(zip(boxes, scores, labels)):
            entry = {"image_id": record["image_id"], "category_id": {1: 3, 2: 7}[int(label)], "score": float(score)}
            direct["bbox"].append({**entry, "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]),
                                                     float(box[3] - box[1])]})
            direct["segm"].append({**entry, "segmentation": mask_utils.encode(
                np.asfortranarray(masks[d].numpy().astype(np.uint8)))})
    ours = dt.coco_evaluate(predictions, data["records"], data["coco"], data["category_ids"], ["bbox", "segm"])
    for iou_type in ("bbox", "segm"):
        evaluation = COCOeval(data["coco"], data["coco"].loadRes(direct[iou_type]), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        expected = dict(zip(["AP", "AP50", "AP75", "APs", "APm", "APl"], evaluation.stats[:6] * 100))
        assert ours[iou_type] == pytest.approx({k: v if v >= 0 else None for k, v in expected.items()})
        assert 0 < ours[iou_type]["AP"] < 100
    empty = [{**p, "boxes": p["boxes"][:0], "scores": p["scores"][:0], "labels": p["labels"][:0]} for p in predictions]
    assert dt.coco_evaluate(empty, data["records"], data["coco"], data["category_ids"])["bbox"]["AP"] == 0.0


def test_training_items_flip_boxes_and_masks_with_the_image_reproducibly(tmp_path):
    root = write_coco(tmp_path, n_train=4, n_val=1)
    records = dt.coco_data(str(root / "annotations" / "instances_train2017.json"), str(root / "train2017"), True)["records"]
    dataset = dt.DetectionImages(records[:1], train=True, seed=0, masks=True)
    plain = dt.DetectionImages(records[:1], train=False)[0][0]
    flips = 0
    for epoch in range(8):
        image, target, _ = dataset[(epoch, 0)]
        again = dataset[(epoch, 0)]
        assert torch.equal(image, again[0]) and torch.equal(target["boxes"], again[1]["boxes"])
        flipped = not torch.equal(image, plain)
        flips += flipped
        assert torch.equal(image, plain.flip(-1) if flipped else plain)
        for box, mask in zip(target["boxes"].round().int().tolist(), target["masks"]):
            x1, y1, x2, y2 = box
            assert mask[y1:y2, x1:x2].float().mean() > 0.9 and mask.sum() <= (x2 - x1 + 1) * (y2 - y1 + 1)
    assert 0 < flips < 8


def keys_of(records, batch_size, processes, rank, start=0, count=27):
    """`count` of one process's training batches (lists of keys (epoch, index)) from iteration `start` on."""
    landscape = np.array([r["width"] >= r["height"] for r in records])
    config = argparse.Namespace(batch_size=batch_size, seed=0)
    return list(itertools.islice(dt.process_batches(landscape, config, processes, rank, start), count))


def test_batches_hold_one_orientation_and_processes_split_the_same_global_batches():
    records = [{"width": 100, "height": 60 if i % 3 else 140} for i in range(40)]
    per_epoch = 27 // 4 + 13 // 4
    landscape = np.array([r["width"] >= r["height"] for r in records])
    assert len(dt.epoch_batches(landscape, 4, 0, 0)) == per_epoch
    batches = keys_of(records, 4, 1, 0, count=3 * per_epoch)
    assert [epoch for batch in batches for epoch, _ in batch] == [e for e in range(3) for _ in range(4 * per_epoch)]
    for batch in batches:
        assert len(batch) == 4 and len({records[i]["width"] >= records[i]["height"] for _, i in batch}) == 1
    first_epoch = [i for batch in batches[:per_epoch] for _, i in batch]
    assert len(set(first_epoch)) == len(first_epoch)  # no image twice in an epoch
    halves = [keys_of(records, 4, 2, rank) for rank in (0, 1)]
    for n, batch in enumerate(batches[:10]):
        assert halves[0][n] + halves[1][n] == batch
    # A resumed run starts at iteration 11: epoch 11 // 9 = 1, its batch 11 % 9 = 2, and goes on as before.
    assert keys_of(records, 4, 1, 0, start=11, count=16) == batches[11:]
    with pytest.raises(ValueError, match="40 training images do not fill one global batch of 32 images"):
        keys_of(records, 32, 1, 0)


# ----------------------------------------------------------------------------- schedule, weight decay, precise BN


def test_lr_warms_up_from_a_thousandth_and_steps_down_tenfold_at_the_recipes_global_batch_of_16():
    config = dt.get_parser().parse_args(["--preset", "voc-c4-24k"])
    for key, value in dt.PRESETS["voc-c4-24k"].items():
        setattr(config, key, value)
    # MoCo's Detectron2 recipe value by value: lr and iterations for a global batch of 16, used as given.
    assert (config.batch_size, config.lr, config.iterations, config.lr_steps, config.warmup_iters) == (
        16, 0.02, 24000, [18000, 22000], 100)
    assert dt.learning_rate(0, config) == pytest.approx(0.02 * 0.001)
    assert dt.learning_rate(50, config) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert dt.learning_rate(100, config) == pytest.approx(0.02)
    assert dt.learning_rate(17999, config) == pytest.approx(0.02)
    assert dt.learning_rate(18000, config) == pytest.approx(0.002)
    assert dt.learning_rate(22000, config) == pytest.approx(0.0002)
    coco = dt.PRESETS["coco-c4-2x"]
    assert (coco["iterations"], coco["lr_steps"], coco["warmup_iters"], coco["model"]) == (180000, [120000, 160000],
                                                                                            1000, "mask-c4")
    assert coco["train_sizes"] == [640, 672, 704, 736, 768, 800] and coco["test_size"] == 800
    assert coco["batch_size"] == 16 and coco["lr"] == 0.02


def test_the_global_batch_is_shared_equally_or_refused_naming_the_nearest_that_splits():
    assert intl.per_process_batch(16, 1) == 16 and intl.per_process_batch(16, 8) == 2  # detection's presets: 16
    with pytest.raises(ValueError, match="--batch_size 10 is the global batch and must split evenly over the 4 "
                                         "processes: give --batch_size 8"):
        intl.per_process_batch(10, 4)
    with pytest.raises(ValueError, match="give --batch_size 4"):
        intl.per_process_batch(3, 4)


def test_weight_decay_spares_exactly_the_normalisation_parameters():
    model = dt.build_detector(tiny_config("mask-c4"), intl.build_backbone("resnet18", "imagenet"), 2)
    decay, no_decay = dt.parameter_groups(model, 1e-4)
    norm_params = {id(p) for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert {id(p) for p in no_decay["params"]} == norm_params and no_decay["weight_decay"] == 0.0
    assert decay["weight_decay"] == 1e-4 and len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p is model.roi_heads.box_predictor.cls_score.bias for p in decay["params"])  # biases are decayed


class _ConvBN(nn.Module):
    """model(images, targets) like a detector, for precise BN."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head_bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm1d(4)

    def forward(self, images, targets=None):
        x = self.bn(self.conv(torch.stack(images)))
        return {"loss": self.head_bn(x.mean(dim=(2, 3))).sum()}


def test_precise_bn_sets_the_statistics_to_the_mean_of_the_per_batch_statistics():
    torch.manual_seed(0)
    model = _ConvBN()
    batches = [([torch.randn(3, 8, 8) * (1 + b) + b for _ in range(4)], None) for b in range(5)]
    with torch.no_grad():
        features = [model.conv(torch.stack(images)) for images, _ in batches]
        pooled = [model.bn.train()(f).mean(dim=(2, 3)) for f in features]
    model.bn.momentum = 0.1
    assert dt.precise_bn(model, batches) == 5
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in features]).mean(0)
    variances = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1) for f in features]).mean(0)  # unbiased, as BN
    assert torch.allclose(model.bn.running_mean, means, atol=1e-5)
    assert torch.allclose(model.bn.running_var, variances, rtol=1e-4)
    assert torch.allclose(model.head_bn.running_mean, torch.stack([p.mean(0) for p in pooled]).mean(0), atol=1e-5)
    assert model.bn.momentum == 0.1 and model.training


# ----------------------------------------------------------------------------- the script: learning, evaluation only, resume, bad input

VOC_ARGS = ["--dataset", "voc", "--train_sets", "2007-trainval",
            "--backbone", "random", "--arch", "resnet18", "--batch_size", "2"]


def main(*args):
    dt.main([str(a) for a in SMALL + VOC_ARGS + list(args)] if "--resume" not in args else [str(a) for a in args])


# The learning run lasts over a minute: its tests are marked slow, as those that start processes are, so that
# `-m "not slow"` stays a quick loop.
@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A ResNet-18 C4 Faster R-CNN trained from random init for 250 iterations on synthetic shapes (96 px).

    250, not fewer: seeds 1-6 gave AP50 79-85 after 250 iterations here, but 59-83 after 150, and 49.7 after 150 on
    another CPU, whose kernels round differently (a change of CPU acts like a change of seed)."""
    torch.set_num_threads(1)  # a module fixture runs before the per-test ones
    root = write_voc(tmp_path_factory.mktemp("voc"), n_trainval=64, n_test=32)
    output_dir = tmp_path_factory.mktemp("learned")
    main("--data_root", root, "--output_dir", output_dir, "--iterations", 250, "--lr", 0.02, "--lr_steps", 187,
         "--warmup_iters", 20, "--save_every", 1000)
    return root, output_dir, json.loads((output_dir / "results.json").read_text())


@pytest.mark.slow
def test_learns_synthetic_shapes_from_random_init_well_above_chance(learned):
    _, output_dir, results = learned
    assert results["bbox"]["AP50"] > 40  # chance is ~0; 79-85 over six seeds (see `learned`)
    assert 0 < results["bbox"]["AP"] < results["bbox"]["AP50"]
    assert results["iterations"] == 250 and results["precise_bn"] and results["test_images"] == 32
    assert set(results["bbox"]["per_class_AP50"]) == set(SHAPES)
    log = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == list(range(5, 251, 5))
    # The RPN learns what is an object (the head losses rise at first, as the proposals get harder).
    assert np.mean([r["loss_objectness"] for r in log[-5:]]) < 0.5 * log[0]["loss_objectness"]
    assert log[0]["lr"] == pytest.approx(0.02 * (0.001 * 0.8 + 0.2))  # the lr of iteration 4 (of 0..249), warming up
    state = json.loads((output_dir / "checkpoints" / "step-00000250" / "trainer_state.json").read_text())
    assert state["iteration"] == 250 and state["precise_bn_done"]


@pytest.mark.slow
def test_eval_only_on_the_final_checkpoint_reproduces_the_results(learned, tmp_path):
    root, output_dir, results = learned
    dt.main(["--eval_only", "--resume", str(output_dir / "checkpoints" / "step-00000250"), "--data_root", str(root),
             "--output_dir", str(tmp_path), "--num_workers", "0"])
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["bbox"] == results["bbox"] and again["iterations"] == 250 and again["precise_bn"]


@pytest.mark.slow
def test_resume_continues_exactly_as_an_uninterrupted_run(tmp_path):
    root = write_voc(tmp_path / "voc", n_trainval=8, n_test=2)
    common = ["--data_root", root, "--iterations", 6, "--lr_steps", 4, "--warmup_iters", 2, "--log_every", 1,
              "--precise_bn", 0]
    main(*common, "--output_dir", tmp_path / "straight", "--stop_after_iters", 4)
    main(*common, "--output_dir", tmp_path / "resumed", "--stop_after_iters", 2)
    main("--resume", "latest", "--output_dir", tmp_path / "resumed", "--stop_after_iters", 4, "--data_root", root,
         "--num_workers", 0, "--log_every", 1)
    straight = load_file(tmp_path / "straight" / "checkpoints" / "step-00000004" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoints" / "step-00000004" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    with pytest.raises(ValueError, match="--lr differs"):
        dt.resolve_config(["--resume", "latest", "--output_dir", str(tmp_path / "resumed"), "--lr", "0.5"])


@pytest.mark.slow
def test_mask_c4_trains_and_evaluates_boxes_and_masks_on_coco_format_data(tmp_path):
    root = write_coco(tmp_path / "coco", n_train=6, n_val=3)
    dt.main([str(a) for a in SMALL + ["--dataset", "coco", "--data_root", root, "--model", "mask-c4", "--backbone",
                                      "random", "--arch", "resnet18", "--batch_size", 2,
                                      "--iterations", 2, "--warmup_iters", 1, "--lr_steps", "--precise_bn", 1,
                                      "--output_dir", tmp_path / "run"]])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    for iou_type in ("bbox", "segm"):
        assert set(results[iou_type]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
        assert all(v is None or 0 <= v <= 100 for v in results[iou_type].values())
        assert results[iou_type]["AP"] is not None
    assert results["test_images"] == 3 and results["model"] == "mask-c4"


def test_presets_set_the_recipe_and_explicit_flags_win():
    config = dt.resolve_config(["--preset", "voc-c4-24k", "--print_config", "--lr", "0.01"])
    assert (config.model, config.iterations, config.lr, config.lr_steps) == ("faster-c4", 24000, 0.01, [18000, 22000])
    assert config.train_sizes == list(range(480, 801, 32))
    coco = dt.resolve_config(["--preset", "coco-c4-2x", "--print_config", "--model", "faster-c4"])
    assert coco.model == "faster-c4" and coco.iterations == 180000
    assert coco.arch == "resnet50"  # what --backbone random builds unless --arch says otherwise


@pytest.mark.slow
def test_bad_input_is_refused_with_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "detect_transfer.py"), "--dataset", "voc", "--data_root",
                             str(tmp_path), "--backbone", "random", "--arch", "resnet18", "--output_dir",
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith(f"error: no VOC 2007-test under {tmp_path}") and "VOCdevkit/VOC2007" in result.stderr


def test_bad_flag_combinations_are_refused_naming_what_to_change(tmp_path):
    # The command line turns each into one `error: ...` line (above).
    base = ["--output_dir", str(tmp_path / "out"), "--data_root", str(tmp_path)]
    for argv, message in [
        (["--dataset", "voc", "--model", "mask-c4", "--backbone", "random", "--arch", "resnet50"], "instance masks"),
        (["--dataset", "voc"], "--backbone is required"),
        (["--backbone", "random", "--arch", "resnet18"], "--dataset is required"),
        (["--dataset", "coco", "--eval_only"], "--eval_only needs --resume"),
        (["--dataset", "voc", "--backbone", "x", "--batch_size", "0"], "--batch_size 0"),
        (["--dataset", "voc", "--backbone", "x", "--resume", str(tmp_path)], "not a detection checkpoint"),
    ]:
        with pytest.raises(ValueError, match=message):
            dt.resolve_config(base + argv)


@pytest.mark.slow
def test_two_gloo_processes_train_and_evaluate_every_test_image_once(tmp_path):
    root = write_voc(tmp_path / "voc", n_trainval=8, n_test=5)
    script = tmp_path / "small_detect_transfer.py"  # detect_transfer.py with small_detector
    script.write_text(f"import sys\nsys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
                      "import test_detect as t\nt.dt.build_detector = t.small_detector\nt.intl.run(t.dt.main)\n")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *SMALL, *VOC_ARGS, "--data_root", str(root), "--batch_size", "4",
         "--iterations", "2", "--lr_steps", "--warmup_iters", "1", "--precise_bn", "1", "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "true",
                                                                     "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "2 process(es)" in output and "global batch 4, 2 iterations" in output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["test_images"] == 5 and results["iterations"] == 2 and results["precise_bn"]


# ----------------------------------------------------------------------------- nothing lost, nothing silently wrong


def broken_coco(root, change):
    """The generated COCO training json, changed by `change(data)` (which may return a replacement)."""
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data) or data))
    return str(path), str(root / "train2017")


@pytest.mark.parametrize("change, message", [
    pytest.param(lambda d: d["annotations"][0]["bbox"].__setitem__(2, float("nan")),
                 r"annotation 1 \(image 100\) has bbox \[\d+, \d+, nan, \d+\]: give 4 finite numbers "
                 r"\[x, y, width, height\]", id="a NaN in a box"),
    pytest.param(lambda d: d["annotations"][0].__setitem__("bbox", [1, 2, 3]),
                 r"annotation 1 \(image 100\) has bbox \[1, 2, 3\]", id="a box of 3 numbers"),
    pytest.param(lambda d: d["annotations"][0].__setitem__("category_id", 99),
                 r"annotation 1 \(image 100\) has category_id 99, which is not among the categories \[3, 7\]",
                 id="an unknown category"),
    pytest.param(lambda d: d.pop("images") and None, "has no 'images' list: not a COCO-format json", id="no images"),
    pytest.param(lambda d: [d], "is not a COCO-format json", id="a list, not an object"),
    pytest.param(lambda d: d.pop("annotations") and None, "has no 'annotations' list: not a COCO-format json",
                 id="no annotations"),
    pytest.param(lambda d: d["images"][0].pop("file_name") and None, r"image 100 has no 'file_name' \(file_name: its "
                 r"path in the image folder; width, height: its size in pixels\); fix or remove the image",
                 id="an image without file_name"),
    pytest.param(lambda d: d["images"][1].pop("height") and None, "image 101 has no 'height'",
                 id="an image without height"),
])
def test_a_broken_coco_json_is_refused_naming_the_annotation_or_what_is_missing(tmp_path, change, message):
    json_file, images = broken_coco(write_coco(tmp_path, n_train=3, n_val=1), change)
    with pytest.raises(ValueError, match=message):
        dt.coco_data(json_file, images, masks=False)


def test_eval_only_writes_next_to_the_run_and_never_over_its_results_without_overwrite(tmp_path):
    root = write_voc(tmp_path / "voc", n_trainval=4, n_test=2)
    output_dir = tmp_path / "run"
    main("--data_root", root, "--output_dir", output_dir, "--iterations", 1, "--lr_steps", "--warmup_iters", 0,
         "--precise_bn", 0)
    checkpoint = output_dir / "checkpoints" / "step-00000001"
    config = dt.resolve_config(["--eval_only", "--resume", str(checkpoint), "--data_root", str(root)])
    assert config.output_dir == str(output_dir / "eval" / "step-00000001")  # not the run's own results.json
    before = (output_dir / "results.json").read_text()
    with pytest.raises(ValueError, match=f"--output_dir {output_dir} already holds results.json of an earlier run, "
                                         "which this command would replace"):
        dt.main(["--eval_only", "--resume", str(checkpoint), "--data_root", str(root), "--output_dir", str(output_dir),
                 "--num_workers", "0"])
    assert (output_dir / "results.json").read_text() == before


def test_a_new_run_replaces_what_an_earlier_run_left_only_with_overwrite(tmp_path):
    root = write_voc(tmp_path / "voc", n_trainval=4, n_test=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"iteration": 5, "loss": 1.0}\n')
    (run / "results.json").write_text('{"bbox": {"AP": 50.0}}\n')
    common = ["--data_root", root, "--output_dir", run, "--iterations", 1, "--lr_steps", "--warmup_iters", 0,
              "--precise_bn", 0]
    with pytest.raises(ValueError, match="already holds results.json of an earlier run, which this command "
                                         "would replace: give another --output_dir \\(or continue the earlier run "
                                         "with --resume latest\\), or add --overwrite to replace it"):
        main(*common)
    assert (run / "results.json").read_text() == '{"bbox": {"AP": 50.0}}\n'
    main(*common, "--overwrite")
    assert json.loads((run / "results.json").read_text())["iterations"] == 1
    assert [json.loads(line)["iteration"] for line in (run / "log.jsonl").read_text().splitlines()] == [1]


@pytest.mark.slow
def test_a_resumed_run_removes_what_interrupted_saves_left(tmp_path):
    root = write_voc(tmp_path / "voc", n_trainval=4, n_test=2)
    main("--data_root", root, "--output_dir", tmp_path / "run", "--iterations", 2, "--lr_steps", "--warmup_iters", 0,
         "--precise_bn", 0, "--stop_after_iters", 1)
    leftover = tmp_path / "run" / "checkpoints" / ".tmp-step-00000009"  # a step this run never saves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a save")
    main("--resume", "latest", "--output_dir", tmp_path / "run", "--data_root", root, "--num_workers", 0)
    assert not leftover.exists() and (tmp_path / "run" / "results.json").is_file()


@pytest.mark.slow
def test_ctrl_c_stops_training_with_one_line_saying_the_iteration_and_how_to_continue(tmp_path, monkeypatch):
    root = write_voc(tmp_path / "voc", n_trainval=4, n_test=2)
    learning_rate = dt.learning_rate

    def ctrl_c_at_iteration_3(iteration, plan):
        if iteration == 3:
            raise KeyboardInterrupt
        return learning_rate(iteration, plan)

    monkeypatch.setattr(dt, "learning_rate", ctrl_c_at_iteration_3)
    with pytest.raises(KeyboardInterrupt) as info:
        main("--data_root", root, "--output_dir", tmp_path / "run", "--iterations", 6, "--lr_steps", "--warmup_iters",
             0, "--precise_bn", 0, "--save_every", 2)
    assert isinstance(info.value, dt.intl.Interrupted)
    assert str(info.value) == ("interrupted at iteration 3; continue with --resume latest (from the last checkpoint, "
                               "step-00000002)")


def voc_xml(root, name):
    path = root / "VOCdevkit" / "VOC2007" / "Annotations" / f"{name}.xml"
    return path, ET.parse(path)


def test_a_voc_object_without_a_bndbox_is_refused_naming_the_xml_file(tmp_path):
    root = write_voc(tmp_path, n_trainval=2, n_test=1)
    path, tree = voc_xml(root, "trainval_0001")
    tree.find("object").remove(tree.find("object/bndbox"))
    tree.write(path)
    with pytest.raises(ValueError, match=f"^{path}: give <size> a <width> and <height> and each <object> a <bndbox> of "
                                         "4 numbers <xmin>, <ymin>, <xmax>, <ymax>$"):
        dt.voc_records(root, "2007-trainval")


def test_a_class_that_is_not_a_voc_class_is_refused_naming_the_xml_file(tmp_path):
    root = write_voc(tmp_path, n_trainval=2, n_test=1)
    path, tree = voc_xml(root, "trainval_0001")
    tree.find("object/name").text = "giraffe"
    tree.write(path)
    with pytest.raises(ValueError, match=f"^{path}: class 'giraffe' is not a VOC class"):
        dt.voc_records(root, "2007-trainval")


def test_boxes_without_area_are_dropped_alike_for_voc_and_coco_and_each_split_says_what_it_left_out(tmp_path):
    """An inverted box or one outside its image (VOC's xmin > xmax, COCO's negative width) is dropped and counted,
    images without an object are left out of training: one line per split names how many, why and the first."""
    voc = write_voc(tmp_path / "voc", n_trainval=3, n_test=1)
    inverted, tree = voc_xml(voc, "trainval_0001")
    box = tree.find("object/bndbox")
    box.find("xmin").text, box.find("xmax").text = box.find("xmax").text, box.find("xmin").text
    tree.write(inverted)
    outside, tree = voc_xml(voc, "trainval_0002")
    for obj in tree.findall("object"):
        obj.find("bndbox/xmin").text, obj.find("bndbox/xmax").text = "200", "220"  # right of the 96 px image
    tree.write(outside)
    objects = [len(voc_xml(voc, f"trainval_{i:04d}")[1].findall("object")) for i in range(3)]
    config = dt.get_parser().parse_args(["--dataset", "voc", "--data_root", str(voc), "--train_sets", "2007-trainval"])
    lines = []
    records = dt.load_split(config, "train", lines.append)["records"]
    assert [len(r["boxes"]) for r in records] == [objects[0], objects[1] - 1]
    assert all(len(r["labels"]) == len(r["difficult"]) == len(r["boxes"]) for r in records)
    assert lines == [f"train set 2007-trainval: {objects[1] - 1 + objects[2]} box(es) without area inside their image "
                     f"dropped (first: {inverted}); 1 image(s) without an object left out (first: "
                     f"{voc / 'VOCdevkit' / 'VOC2007' / 'JPEGImages' / 'trainval_0002.jpg'})"]

    coco = write_coco(tmp_path / "coco", n_train=3, n_val=1)
    broken_coco(coco, lambda d: d["annotations"][0]["bbox"].__setitem__(2, -5))
    config = dt.get_parser().parse_args(["--dataset", "coco", "--data_root", str(coco)])
    lines = []
    dt.load_split(config, "train", lines.append)
    # Image 100 loses its one object (its crowd box is not counted), image 102 never had one.
    assert lines == [f"train set {coco / 'annotations' / 'instances_train2017.json'}: 1 box(es) without area inside "
                     "their image dropped (first: annotation 1 of image 100); 2 image(s) without an object left out "
                     f"(first: {coco / 'train2017' / '000000000100.jpg'})"]
    lines = []
    dt.load_split(config, "test", lines.append)
    assert lines == []  # nothing left out


def test_a_voc_test_set_without_scorable_objects_is_refused_or_named_before_any_training(tmp_path, monkeypatch):
    root = write_voc(tmp_path, n_trainval=4, n_test=3, difficult_every=1)  # every object difficult

    def no_training(*args):
        raise AssertionError("training started")

    monkeypatch.setattr(dt, "train", no_training)
    monkeypatch.setattr(dt, "load_detection_backbone", no_training)
    with pytest.raises(ValueError, match="^the VOC test set 2007-test has no object that is not difficult, so "
                                         "nothing to score: give another --test_set$"):
        main("--data_root", root, "--output_dir", tmp_path / "run")
    root = write_voc(tmp_path / "some", n_trainval=1, n_test=3)
    for i in range(3):  # every bicycle of the test set difficult
        path, tree = voc_xml(root, f"test_{i:04d}")
        for obj in tree.findall("object"):
            obj.find("difficult").text = str(int(obj.find("name").text == "bicycle"))
        tree.write(path)
    config = dt.get_parser().parse_args(["--dataset", "voc", "--data_root", str(root)])
    lines = []
    dt.load_split(config, "test", lines.append)
    unscored = ", ".join(name for name in dt.VOC_CLASSES if name != "aeroplane")  # bicycle and those never drawn
    assert lines == [f"test set 2007-test: no object that is not difficult of {unscored}: left out of the AP"]


def test_a_checkpoints_folder_that_cannot_be_written_ends_the_run_in_one_error_line(tmp_path, monkeypatch):
    """checkpoints/ made read-only during training (after step 1's save), then before a resume: the error boundary
    turns the OSError into one line naming the folder it could not write."""
    root = write_voc(tmp_path / "voc", n_trainval=4, n_test=2)
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # read-only even for root, who may write anywhere
        if self.parent.name == "checkpoints" and self.name != ".tmp-step-00000001":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    run = tmp_path / "run"
    for argv in ([*SMALL, *VOC_ARGS, "--data_root", root, "--output_dir", run, "--iterations", 3, "--save_every", 1,
                  "--lr_steps", "--warmup_iters", 0, "--precise_bn", 0],
                 ["--resume", "latest", "--output_dir", run, "--data_root", root, "--num_workers", 0]):
        with pytest.raises(SystemExit) as exit_info:
            intl.run(dt.main, [str(a) for a in argv])
        assert exit_info.value.code == (f"error: [Errno 13] Permission denied: "
                                        f"'{run / 'checkpoints' / '.tmp-step-00000002'}'")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001"]
