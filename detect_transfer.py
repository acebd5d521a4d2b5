"""Detection transfer of a pretrained backbone: Faster / Mask R-CNN on VOC and COCO, on torchvision alone.

    python detect_transfer.py --preset voc-c4-24k --backbone runs/in1k/backbone --data_root /data/voc \\
        --output_dir runs/voc                                           # VOC07+12 trainval -> VOC07 test
    accelerate launch --multi_gpu --num_processes 8 detect_transfer.py --preset coco-c4-2x \\
        --backbone runs/in1k/backbone --data_root /data/coco --output_dir runs/coco
    python detect_transfer.py --eval_only --resume runs/voc/checkpoints/step-00024000 --data_root /data/voc

The papers (INTL, CW-RGP) follow MoCo's protocol with Detectron2: ResNet-50-C4, every layer fine-tuned with
synchronised BatchNorm. Detectron2 is not on PyPI, so the same models (--model faster-c4 | mask-c4) are built
from torchvision's parts: res2..res4 (stride 16) -> a single-level RPN, anchors 32..512 x (0.5, 1, 2); RoIAlign
14 x 14 at 1/16 with aligned=True -> res5 + an extra BatchNorm2d -> average pool -> box predictor (and, for masks,
res5's 7 x 7 maps -> a 2 x 2 deconvolution -> per-class 14 x 14 masks); res5 runs once per RoI in training.

Known differences from Detectron2 (torchvision's parts are used as they are; their effect on the papers' numbers
has not been measured):
  - box losses: smooth L1 with beta 1/9 (Detectron2: L1);
  - box predictor: 4 (K + 1) outputs with an unused background slot (Detectron2: 4 K);
  - mask targets: cut from full-image masks by RoIAlign (Detectron2: from polygons);
  - images: resized as normalised float tensors, padded to a multiple of 32 (Detectron2 C4: no padding);
  - the RPN drops boxes smaller than 1e-3 pixels;
  - BatchNorm becomes SyncBatchNorm only with several GPUs: several CPU processes each normalise their own batch.

Evaluation: VOC as Detectron2 / MoCo report it (`voc_evaluate`), COCO by COCOeval (bbox; segm for mask models).
"""

import argparse
import bisect
import contextlib
import io
import itertools
import json
import math
import os
import time
import warnings
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from PIL import Image as PILImage
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import RoIAlign
from tqdm.auto import tqdm

import intl

MODELS = ("faster-c4", "mask-c4")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50:0.05:0.95

# The papers' (MoCo's Detectron2) recipes, each for its global batch of 16; for another global batch B, MoCo scales
# the lr by B / 16 and the iteration counts by 16 / B.
PRESETS = {
    "voc-c4-24k": dict(dataset="voc", model="faster-c4", iterations=24000, lr_steps=[18000, 22000], warmup_iters=100,
                       lr=0.02, batch_size=16, train_sizes=list(range(480, 801, 32)), test_size=800,
                       max_size=1333),
    "coco-c4-2x": dict(dataset="coco", model="mask-c4", iterations=180000, lr_steps=[120000, 160000],
                       warmup_iters=1000, lr=0.02, batch_size=16, train_sizes=list(range(640, 801, 32)),
                       test_size=800, max_size=1333),
}
# Flags that say what this one command does: never taken from the checkpoint.
PER_COMMAND = {"output_dir", "resume", "eval_only", "print_config", "stop_after_iters", "overwrite"}
# Those and the other flags that only steer the run, not what it computes: a resumed run may change them, and keeps
# their saved values when they are not given again.
RUN_CONTROL = PER_COMMAND | {"num_workers", "log_every", "save_every", "keep", "data_root", "train_json",
                             "train_images", "test_json", "test_images", "eval_batch_size"}
# What a training run leaves in --output_dir: a new run there must not mix with, nor replace, an earlier run's. Its
# log.jsonl is not among them: a new run empties it, so a run stopped before its first checkpoint can be rerun.
RESULTS = ("checkpoints", "results.json")
# The valid range of every numeric flag (intl.check_settings), checked before any work and in saved configs.
RANGES = {**dict.fromkeys(("train_sizes", "test_size", "max_size", "batch_size", "iterations", "save_every", "keep",
                           "eval_batch_size", "stop_after_iters", "log_every"), "[1, inf)"),
          **dict.fromkeys(("num_workers", "lr_steps", "warmup_iters", "weight_decay", "precise_bn"), "[0, inf)"),
          "seed": "[0, 4294967295]", "mean": "(-inf, inf)", "std": "(0, inf)", "lr": "(0, inf)"}


def get_parser():
    parser = argparse.ArgumentParser(description="Detection transfer: Faster / Mask R-CNN C4 on VOC or COCO",
                                     allow_abbrev=False, formatter_class=intl.HelpFormatter)

    add = parser.add_argument_group("data").add_argument
    add("--dataset", choices=["voc", "coco"], help="voc: VOC-format folders; coco: a COCO-format json + image folder")
    add("--data_root", help="voc: the folder holding VOCdevkit/; coco: the one with annotations/, train2017/, val2017/")
    add("--train_sets", default="2007-trainval,2012-trainval", help="voc: YEAR-IMAGESET pairs trained on")
    add("--test_set", default="2007-test", help="voc: the YEAR-IMAGESET evaluated on")
    add("--train_json", help="coco: training annotations; None: DATA_ROOT/annotations/instances_train2017.json")
    add("--train_images", help="coco: training image folder; None: DATA_ROOT/train2017")
    add("--test_json", help="coco: test annotations; None: DATA_ROOT/annotations/instances_val2017.json")
    add("--test_images", help="coco: test image folder; None: DATA_ROOT/val2017")
    add("--train_sizes", type=int, nargs="+", default=list(range(480, 801, 32)), help="training short sides, one drawn")
    add("--test_size", type=int, default=800, help="test short side in pixels")
    add("--max_size", type=int, default=1333, help="cap on the long side in pixels")
    add("--mean", type=float, nargs=3, help="input normalisation mean, RGB in [0, 1]; None: the backbone's")
    add("--std", type=float, nargs=3, help="input normalisation std; None: the backbone's")
    add("--num_workers", type=int, default=4, help="data loader processes per training process")

    add = parser.add_argument_group("model").add_argument
    add("--model", default="faster-c4", choices=MODELS, help="Faster / Mask R-CNN on ResNet-C4, as in the papers")
    add("--backbone", help="a backbone as intl.load_backbone takes it (see README), or 'random' (from scratch)")
    add("--arch", default="resnet50", choices=intl.RESNETS, help="the ResNet of --backbone random")
    add("--revision", help="Hub branch, tag or commit of --backbone")

    add = parser.add_argument_group("optimisation / schedule").add_argument
    add("--batch_size", type=int, default=16, help="the global batch: images per iteration over all processes")
    add("--iterations", type=int, default=24000, help="training iterations")
    add("--lr", type=float, default=0.02, help="peak learning rate (the papers': 0.02 at a global batch of 16)")
    add("--lr_steps", type=int, nargs="*", default=[18000, 22000], help="iterations after which the lr drops x0.1")
    add("--warmup_iters", type=int, default=100, help="linear warm-up iterations")
    add("--weight_decay", type=float, default=1e-4, help="weight decay, none on normalisation parameters")
    add("--mixed_precision", choices=["no", "fp16", "bf16"], help="autocast precision; None: Accelerate's config")

    add = parser.add_argument_group("evaluation").add_argument
    add("--precise_bn", type=int, default=200, help="training batches per process for precise BN statistics (0: off)")
    add("--eval_batch_size", type=int, default=1, help="test images per process per forward pass")
    add("--eval_only", action="store_true", help="evaluate the --resume checkpoint; OUTPUT_DIR: the run's eval/step-N")

    add = parser.add_argument_group("run").add_argument
    add("--preset", choices=sorted(PRESETS), help="the papers' recipes (Faster R-CNN on VOC, Mask R-CNN on COCO)")
    add("--output_dir", type=intl.folder, help="where checkpoints/, log.jsonl and results.json go")
    add("--resume", type=intl.folder, help="'latest' (in --output_dir) or a checkpoint folder: continue exactly")
    add("--overwrite", action="store_true", help="let a new run (or --eval_only) replace an earlier run's results")
    add("--seed", type=int, default=0, help="seed of the head initialisation, data order and flips")
    add("--save_every", type=int, default=2000, help="save a checkpoint every N iterations and at the end")
    add("--keep", type=int, default=2, help="keep the last K checkpoints")
    add("--stop_after_iters", type=int, help="save and stop after this many iterations (continue with --resume)")
    add("--log_every", type=int, default=20, help="log the losses and the lr every N iterations")
    add("--print_config", action="store_true", help="print the resolved configuration and exit")
    return parser


def main(argv=None):
    config = resolve_config(argv)
    if config.print_config:
        return print(json.dumps(vars(config), indent=2))
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    with intl.locked(config.output_dir, accelerator.is_main_process):
        transfer(config, accelerator)


def transfer(config, accelerator):
    """Data -> model -> fine-tuning (or a checkpoint) -> evaluation, in the locked output folder."""
    checkpoint = intl.find_checkpoint(config.resume, config.output_dir, "detection") if config.resume else None
    intl.clear_earlier_run(config.output_dir, ["results.json"] if config.eval_only else RESULTS, config.overwrite,
                           None if config.eval_only else checkpoint, accelerator.print, accelerator.is_main_process)
    if not config.eval_only:  # refused before any loading
        intl.per_process_batch(config.batch_size, accelerator.num_processes)

    # Data: the test images with their ground truth; the training records unless only evaluating.
    test_data = load_split(config, "test", accelerator.print)
    train_records = None if config.eval_only else load_split(config, "train", accelerator.print)["records"]

    # Model: the same initialisation on every process. A checkpoint holds every weight, so with one the backbone is
    # only built, not read.
    set_seed(config.seed)
    backbone, config = load_detection_backbone(config, random=checkpoint is not None)
    model = build_detector(config, backbone, len(test_data["classes"]))
    model = intl.sync_batchnorm(model, accelerator).to(accelerator.device)
    accelerator.print(f"{accelerator.num_processes} process(es) on {accelerator.device}; {config.model} on "
                      f"{config.arch}; {len(test_data['classes'])} classes, {len(test_data['records'])} test images")

    if config.eval_only:  # the checkpoint's weights, strictly and only if finite
        weights = intl.read_safetensors(checkpoint / "model.safetensors")
        intl.check_weights(weights, f"the weights of {checkpoint}")
        model.load_state_dict(weights, strict=True)
        state = intl.read_json(checkpoint / "trainer_state.json")
    else:
        state = fine_tune(model, train_records, checkpoint, config, accelerator)
        if state is None:
            return  # --stop_after_iters: the checkpoint is saved; continue with --resume
    evaluate(model, test_data, state, config, accelerator)
    accelerator.end_training()


def fine_tune(model, train_records, checkpoint, config, accelerator):
    """Train (from the checkpoint, if any) up to --stop_after_iters or the end of the schedule, then precise BN ->
    the trainer state, None if the schedule is not done."""
    # From here on each process draws its own random numbers (the anchors and RoIs sampled for the losses).
    set_seed(config.seed, device_specific=True)
    # Detectron2's SGD: momentum 0.9, weight decay on every parameter but normalisation ones (WEIGHT_DECAY_NORM 0).
    optimizer = torch.optim.SGD(parameter_groups(model, config.weight_decay), lr=0.0, momentum=0.9)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    state = {"iteration": 0, "precise_bn_done": False}
    if checkpoint:
        checkpoint, state = intl.load_checkpoint(accelerator, config.resume, config.output_dir, "detection",
                                                 check_state=check_trainer_state)
        accelerator.print(f"resumed from {checkpoint} at iteration {state['iteration']}")
    if accelerator.is_main_process:  # the log keeps the iterations before this one: none for a new run
        intl.truncate_jsonl(Path(config.output_dir) / "log.jsonl", state["iteration"], key="iteration")
    accelerator.print(f"{len(train_records)} training images; global batch {config.batch_size}, "
                      f"{config.iterations} iterations")

    stop_at = min(config.iterations, config.stop_after_iters or config.iterations)
    if state["iteration"] < stop_at:
        state = train(prepared, optimizer, train_records, range(state["iteration"], stop_at), config, accelerator)
    if state["iteration"] < config.iterations:
        return None
    if config.precise_bn and not state.get("precise_bn_done"):
        accelerator.print(f"precise BN: BatchNorm statistics over {config.precise_bn} training batches per process")
        batches = training_batches(train_records, config, accelerator, start=state["iteration"])
        precise_bn(model, itertools.islice(batches, config.precise_bn), accelerator)
        state = {"iteration": state["iteration"], "precise_bn_done": True}
        save_checkpoint(accelerator, config, state)
    return state


def train(model, optimizer, train_records, iterations, config, accelerator):
    """Train over `iterations` (a range) -> the state saved with the last checkpoint."""
    start, stop_at = iterations.start, iterations.stop
    last_good = intl.latest_checkpoint(config.output_dir)  # what the messages point to if the loss breaks or on Ctrl-C
    progress = tqdm(total=stop_at, initial=start, disable=not accelerator.is_main_process, desc="detection")
    batches = training_batches(train_records, config, accelerator, start)
    iteration, tic = start, time.time()
    model.train()
    try:
        for images, targets in itertools.islice(batches, stop_at - start):
            if intl.stop_requested:  # a Ctrl-C or SIGTERM that a finaliser swallowed
                raise KeyboardInterrupt
            lr = learning_rate(iteration, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = model(images, targets)
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                parts = ", ".join(f"{name} {value.item():.4g}" for name, value in losses.items())
                raise FloatingPointError(f"the loss is {loss.item()} at iteration {iteration} ({parts}); the last good "
                                         f"checkpoint is {last_good or 'none'}. Lower --lr or lengthen the warm-up")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            iteration += 1
            progress.update(1)

            # After every iteration, in one place: the log, then the checkpoint.
            if iteration % config.log_every == 0 or iteration == stop_at:
                means = accelerator.reduce(torch.stack([loss, *losses.values()]).detach(), "mean").tolist()
                record = {"iteration": iteration, "loss": means[0], **dict(zip(losses, means[1:])), "lr": lr,
                          "images_per_s": (iteration - start) * config.batch_size / (time.time() - tic)}
                progress.set_postfix(loss=f"{means[0]:.3f}", img_s=f"{record['images_per_s']:.2f}")
                if accelerator.is_main_process:
                    with open(Path(config.output_dir) / "log.jsonl", "a") as log:
                        log.write(json.dumps(record) + "\n")
            if iteration % config.save_every == 0 or iteration == stop_at:
                last_good = save_checkpoint(accelerator, config, {"iteration": iteration, "precise_bn_done": False})
    except KeyboardInterrupt:
        raise intl.Interrupted(f"iteration {iteration}", last_good) from None
    finally:
        progress.close()  # before any error message, so that the message is the last line
    return {"iteration": iteration, "precise_bn_done": False}


def evaluate(model, test_data, state, config, accelerator):
    """Evaluate on the test set; the main process prints the table and writes OUTPUT_DIR/results.json."""
    tic = time.time()
    predictions = predict(model, test_data["records"], config, accelerator)
    if not accelerator.is_main_process:
        return
    if config.dataset == "voc":
        results = {"bbox": voc_evaluate(predictions, test_data["records"], test_data["classes"])}
    else:
        results = coco_evaluate(predictions, test_data["records"], test_data["coco"], test_data["category_ids"],
                                ["bbox", "segm"] if has_masks(config) else ["bbox"])
    print(f"{config.model} on {test_data['name']}, {state['iteration']} iterations: " + "; ".join(
        f"{iou_type} AP {r['AP']:.2f}, AP50 {r['AP50']:.2f}, AP75 {r['AP75']:.2f}" for iou_type, r in results.items()))
    results.update(dataset=config.dataset, test_set=test_data["name"], test_images=len(test_data["records"]),
                   model=config.model, arch=config.arch, backbone=config.backbone, iterations=state["iteration"],
                   precise_bn=bool(state.get("precise_bn_done")), eval_seconds=round(time.time() - tic, 1))
    intl.write_text_atomically(Path(config.output_dir) / "results.json", json.dumps(results, indent=2) + "\n")


# -----------------------------------------------------------------------------
# Configuration, checkpoints, schedule


def resolve_config(argv=None):
    """Flags > preset > argparse defaults; a resumed run keeps its checkpoint's configuration."""
    parser = get_parser()
    parser.set_defaults(**PRESETS.get(parser.parse_known_args(argv)[0].preset, {}))
    config = parser.parse_args(argv)
    if config.eval_only and not config.resume:
        raise ValueError("--eval_only needs --resume CHECKPOINT (or 'latest' with --output_dir): what to evaluate")
    if config.resume:
        checkpoint = intl.find_checkpoint(config.resume, config.output_dir, "detection")
        explicit = intl.explicit_flags(parser, argv)
        intl.keep_resumed_config(config, explicit, checkpoint, (RUN_CONTROL, PER_COMMAND), parser, RANGES)
        if config.output_dir is None:  # OUTPUT_DIR/checkpoints/step-N -> OUTPUT_DIR (--eval_only: its eval/step-N)
            run_dir = checkpoint.resolve().parent.parent
            config.output_dir = str(run_dir / "eval" / checkpoint.name if config.eval_only else run_dir)
    intl.check_settings(vars(config), parser, RANGES)
    if config.print_config:
        return config
    # Refuse what cannot run, naming the flag to change (--help says what each one is).
    splits = ("test",) if config.eval_only else ("train", "test")
    coco_files_given = all(getattr(config, f"{split}_{what}") for split in splits for what in ("json", "images"))
    required = ["output_dir", "dataset"] + ([] if config.resume else ["backbone"])
    if not (config.dataset == "coco" and coco_files_given):  # COCO's file flags stand in for --data_root
        required.append("data_root")
    if missing := [f"--{flag} is required" for flag in required if getattr(config, flag) is None]:
        raise ValueError("; ".join(missing))
    if config.dataset == "voc" and has_masks(config):
        raise ValueError(f"--model {config.model} needs instance masks, which VOC detection annotations do not "
                         "have: use faster-c4 on VOC, or a COCO-format dataset with segmentations")
    if sorted(config.lr_steps) != list(config.lr_steps):
        raise ValueError(f"--lr_steps {config.lr_steps}: give increasing iteration counts")
    return config


def has_masks(config):
    return config.model.startswith("mask")


def check_trainer_state(folder, state):
    if not isinstance(state.get("iteration"), int):
        raise ValueError(f"{folder / 'trainer_state.json'} holds no iteration count: the file is damaged; "
                         "resume from another checkpoint")


def save_checkpoint(accelerator, config, state):
    """OUTPUT_DIR/checkpoints/step-N (iteration N), written atomically, the last --keep kept -> its folder."""
    return intl.save_state_atomically(accelerator, Path(config.output_dir) / "checkpoints" /
                                      f"step-{state['iteration']:08d}", "trainer_state.json",
                                      {**state, "config": vars(config)}, config.keep)


def learning_rate(iteration, config):
    """Detectron2's WarmupMultiStepLR: a linear ramp from 0.001 x lr (its WARMUP_FACTOR) over the warm-up, then x0.1
    from each step's iteration on."""
    alpha = min(1.0, iteration / config.warmup_iters) if config.warmup_iters else 1.0  # 1: warmed up
    warmup = 0.001 * (1 - alpha) + alpha
    return config.lr * warmup * 0.1 ** bisect.bisect_right(config.lr_steps, iteration)


def parameter_groups(model, weight_decay):
    norm_layers = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # BatchNorm, SyncBatchNorm, ...
    norm = {id(p) for m in model.modules() if isinstance(m, norm_layers) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in norm], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in norm], "weight_decay": 0.0}]


@torch.no_grad()
def precise_bn(model, batches, accelerator=None):
    """Every BatchNorm's running mean and variance <- the mean of its statistics over `batches`, averaged over the
    processes -> the number of batches. With momentum None, BatchNorm keeps exactly that mean after a reset."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    count = 0
    for count, (images, targets) in enumerate(batches, start=1):
        model(images, targets)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        if accelerator is not None and accelerator.num_processes > 1:
            m.running_mean.copy_(accelerator.reduce(m.running_mean.clone(), "mean"))
            m.running_var.copy_(accelerator.reduce(m.running_var.clone(), "mean"))
    return count


# -----------------------------------------------------------------------------
# Models: R50-C4 as in the papers (Detectron2's Res5ROIHeads)


def load_detection_backbone(config, random=False):
    """The --backbone ResNet (loaded strictly by intl.load_backbone; random: a fresh one of --arch) and the run's
    configuration with the backbone's arch and, unless --mean / --std give one, its input normalisation."""
    if random or config.backbone == "random":
        backbone = intl.build_backbone(config.arch, "imagenet", zero_init_residual=False)
        found = {"arch": config.arch, "mean": intl.IMAGENET_MEAN, "std": intl.IMAGENET_STD}
    else:
        backbone, found = intl.load_backbone(config.backbone, revision=config.revision)
        if found["stem"] != "imagenet":
            raise ValueError(f"{config.backbone} has a {found['stem']} stem (3x3 stride-1 conv1): its res4 does not "
                             "have stride 16, so it does not fit the detectors; use a backbone pretrained with the "
                             "ImageNet stem")
    config = argparse.Namespace(**{**vars(config), "arch": found["arch"], "mean": list(config.mean or found["mean"]),
                                   "std": list(config.std or found["std"])})
    return backbone.train(), config


def build_detector(config, backbone, num_classes):
    """A torchvision ResNet -> the --model detector for num_classes classes (+ background), every layer trainable.
    Every RPN and RoI number below is Detectron2's C4 configuration's (the thresholds and fractions: FasterRCNN's)."""
    # res2..res4 under torchvision's names, so that the weights keep the ResNet's keys; res4 has half res5's width.
    body = nn.Sequential(OrderedDict((name, getattr(backbone, name)) for name in
                                     ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")))
    # The C4 box head: res5 and MoCo's extra BatchNorm2d (Res5ROIHeadsExtraNorm): RoIs -> maps [R, C, 7, 7].
    box_head = nn.Sequential(OrderedDict(layer4=backbone.layer4, norm=nn.BatchNorm2d(backbone.feature_dim)))
    anchors = AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),))
    rpn = RegionProposalNetwork(
        anchors, RPNHead(backbone.feature_dim // 2, anchors.num_anchors_per_location()[0]), fg_iou_thresh=0.7,
        bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
        pre_nms_top_n=dict(training=12000, testing=6000), post_nms_top_n=dict(training=2000, testing=1000),
        nms_thresh=0.7)
    pooler = RoIAlign(14, 1 / 16, sampling_ratio=0, aligned=True)  # Detectron2's ROIAlignV2
    heads = C4RoIHeads(
        pooler, box_head, FastRCNNPredictor(backbone.feature_dim, num_classes + 1), fg_iou_thresh=0.5,
        bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
        bbox_reg_weights=None, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100)
    if has_masks(config):  # no mask convolutions: the deconvolution reads res5's maps of the box branch
        heads.mask_roi_pool, heads.mask_head = pooler, nn.Identity()
        heads.mask_predictor = MaskRCNNPredictor(backbone.feature_dim, 256, num_classes + 1)
    init_predictors(heads)
    transform = DetectionTransform(config.train_sizes, config.test_size, config.max_size, config.mean, config.std)
    return GeneralizedRCNN(body, rpn, heads, transform)


class C4RoIHeads(RoIHeads):
    """Detectron2's Res5ROIHeads on torchvision's RoIHeads: in training res5's 7 x 7 maps of the sampled RoIs feed
    both predictors; at test time the masks come from a second res5 pass on the final detections, as in Detectron2."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        maps = self.box_head(self.box_roi_pool(features["0"], proposals))
        class_logits, box_regression = self.box_predictor(maps.mean(dim=(2, 3)))
        if self.training:
            loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
            losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}
            if self.has_mask():
                foreground = [label > 0 for label in labels]
                mask_logits = self.mask_predictor(self.mask_head(maps[torch.cat(foreground)]))
                losses["loss_mask"] = maskrcnn_loss(
                    mask_logits, [p[f] for p, f in zip(proposals, foreground)], [t["masks"] for t in targets],
                    [t["labels"] for t in targets], [m[f] for m, f in zip(matched_idxs, foreground)])
            return [], losses
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        result = [{"boxes": b, "labels": l, "scores": s} for b, l, s in zip(boxes, labels, scores)]
        if self.has_mask():
            maps = self.box_head(self.box_roi_pool(features["0"], boxes))
            for r, probabilities in zip(result, maskrcnn_inference(self.mask_predictor(self.mask_head(maps)), labels)):
                r["masks"] = probabilities
        return result, {}


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's normalise + resize + pad-to-32 batching of float RGB images in [0, 1], with a test size of its
    own: the short side is drawn per image from train_sizes in training, test_size at test time (torchvision would
    test at the largest training size); the long side stays <= max_size."""

    def __init__(self, train_sizes, test_size, max_size, mean, std):
        super().__init__(tuple(train_sizes), max_size, list(mean), list(std))
        self.train_sizes, self.test_size = tuple(train_sizes), test_size

    def train(self, mode=True):
        self.min_size = self.train_sizes if mode else (self.test_size,)
        return super().train(mode)


def init_predictors(heads):
    """Detectron2's initialisation: class scores and box deltas from N(0, 0.01) and N(0, 0.001); the C4 mask head's
    2 x 2 stride-2 deconvolution to 256 channels (MSRA init), then per-class mask logits from N(0, 0.001); no bias."""
    layers = [(heads.box_predictor.cls_score, 0.01), (heads.box_predictor.bbox_pred, 0.001)]
    if heads.has_mask():
        nn.init.kaiming_normal_(heads.mask_predictor.conv5_mask.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(heads.mask_predictor.conv5_mask.bias)
        layers.append((heads.mask_predictor.mask_fcn_logits, 0.001))
    for layer, std in layers:
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


# -----------------------------------------------------------------------------
# Data: VOC (torchvision's VOCDetection layout) and COCO-format (pycocotools), as records
#
# A record is one image: its file, size, boxes [N, 4] (x1, y1, x2, y2, 0-based continuous coordinates),
# labels [N] (1..K, 0 is the background), difficult [N] (VOC) and, for COCO, its image id and the
# RLE masks of its instances; `dropped` names the boxes left out, without area inside the image. VOC
# boxes are 1-based inclusive pixel indices in the XML: x1 and y1 lose 1, as Detectron2 does;
# evaluation turns them back into the devkit's coordinates.


def load_split(config, split, say=print):
    """The "train" or "test" images: {"name", "classes", "records"}, and for COCO the ground truth COCOeval reads.
    Training keeps the images that hold an object, as Detectron2 does. One line says what was left out; a VOC test
    set without an object that is not difficult is refused before any training."""
    if config.dataset == "voc":
        name = config.train_sets if split == "train" else config.test_set
        records = [r for spec in name.split(",") for r in voc_records(config.data_root, spec.strip())]
        data = {"name": name, "classes": VOC_CLASSES, "records": records}
    else:  # --train_json etc., by default COCO 2017's files under --data_root
        folder = {"train": "train2017", "test": "val2017"}[split]
        json_file = getattr(config, f"{split}_json") or os.path.join(config.data_root, "annotations",
                                                                     f"instances_{folder}.json")
        image_dir = getattr(config, f"{split}_images") or os.path.join(config.data_root, folder)
        data = {"name": json_file, **coco_data(json_file, image_dir, masks=split == "train" and has_masks(config))}
    records, notes = data["records"], []
    if dropped := [where for r in records for where in r["dropped"]]:
        notes.append(f"{len(dropped)} box(es) without area inside their image dropped (first: {dropped[0]})")
    if split == "train":
        data["records"] = [r for r in records if len(r["boxes"])]
        if not data["records"]:
            raise ValueError(f"the training set {data['name']} has no image with an object")
        if empty := [r["file"] for r in records if not len(r["boxes"])]:
            notes.append(f"{len(empty)} image(s) without an object left out (first: {empty[0]})")
    elif config.dataset == "voc":
        scorable = {int(label) for r in records for label in r["labels"][~r["difficult"]]}
        if not scorable:
            raise ValueError(f"the VOC test set {data['name']} has no object that is not difficult, so nothing to "
                             "score: give another --test_set")
        if unscored := [c for i, c in enumerate(data["classes"], start=1) if i not in scorable]:
            notes.append(f"no object that is not difficult of {', '.join(unscored)}: left out of the AP")
    if notes:
        say(f"{split} set {data['name']}: " + "; ".join(notes))
    return data


def voc_records(root, spec):
    """'2007-trainval' under ROOT/VOCdevkit/VOC2007 -> records, through torchvision's VOCDetection."""
    year, _, image_set = spec.partition("-")
    try:
        dataset = torchvision.datasets.VOCDetection(root, year=year, image_set=image_set)
    except (RuntimeError, FileNotFoundError):
        where = f"{root}/VOCdevkit/VOC{year}"
        raise ValueError(f"no VOC {spec} under {root}: expected {where}/JPEGImages/*.jpg, {where}/Annotations/*.xml "
                         f"and {where}/ImageSets/Main/{image_set}.txt (as the VOC tarballs unpack; --data_root is the "
                         "folder holding VOCdevkit/)") from None
    label = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
    records = []
    for image_file, xml_file in zip(dataset.images, dataset.annotations):
        try:
            annotation = dataset.parse_voc_xml(ET.parse(xml_file).getroot())["annotation"]
        except ET.ParseError as error:  # a missing file raises an OSError, which names it
            raise ValueError(f"{xml_file} is not a VOC annotation: {error}") from None
        objects = annotation.get("object", [])
        if unknown := [o.get("name") for o in objects if o.get("name") not in label]:
            raise ValueError(f"{xml_file}: class {unknown[0]!r} is not a VOC class (another class set: a COCO-format "
                             "dataset)")
        try:
            width, height = int(annotation["size"]["width"]), int(annotation["size"]["height"])
            corners = [[float(o["bndbox"][k]) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objects]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{xml_file}: give <size> a <width> and <height> and each <object> a <bndbox> of 4 "
                             "numbers <xmin>, <ymin>, <xmax>, <ymax>") from None
        boxes = [clip_box([x1 - 1, y1 - 1, x2, y2], width, height) for x1, y1, x2, y2 in corners]
        kept = [o for o, box in zip(objects, boxes) if box is not None]
        records.append({"file": image_file, "width": width, "height": height,
                        "boxes": np.array([b for b in boxes if b is not None], np.float32).reshape(-1, 4),
                        "labels": np.array([label[o["name"]] for o in kept], np.int64),
                        "difficult": np.array([int(o.get("difficult", 0)) == 1 for o in kept], bool),
                        "dropped": [xml_file] * (len(objects) - len(kept))})
    return records


def coco_data(json_file, image_dir, masks):
    """A COCO-format json + image folder -> {"records", "classes", "category_ids", "coco"}, without crowd instances
    and with boxes clipped (clip_box). Category ids become labels 1..K in id order; `category_ids` maps them back."""
    if not os.path.isfile(json_file) or not os.path.isdir(image_dir):
        raise ValueError(f"no COCO-format data at {json_file} + {image_dir}: expected a COCO json (images, "
                         "annotations, categories) and the folder its file_names are relative to, e.g. "
                         "DATA_ROOT/annotations/instances_train2017.json + DATA_ROOT/train2017/ (and val2017)")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco = COCO(json_file)
        except (ValueError, KeyError, TypeError, AssertionError) as error:
            raise ValueError(f"{json_file} is not a COCO-format json: {error}") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.dataset.get(key), list):
            raise ValueError(f"{json_file} has no {key!r} list: not a COCO-format json")
    category_ids = sorted(coco.getCatIds())
    label = {cat: i + 1 for i, cat in enumerate(category_ids)}
    records = []
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        if bad := [k for k, kind in (("file_name", str), ("width", int), ("height", int)) if not isinstance(
                info.get(k), kind)]:
            raise ValueError(f"{json_file}: image {image_id} has no {bad[0]!r} (file_name: its path in the image "
                             "folder; width, height: its size in pixels); fix or remove the image")
        annotations = [ann for ann in coco.imgToAnns.get(image_id, []) if not ann.get("iscrowd", 0)]
        boxes = [coco_box(ann, info, label, json_file, masks) for ann in annotations]
        instances = [(box, ann) for box, ann in zip(boxes, annotations) if box is not None]
        records.append({"file": os.path.join(image_dir, info["file_name"]), "image_id": image_id,
                        "width": info["width"], "height": info["height"],
                        "boxes": np.array([box for box, _ in instances], np.float32).reshape(-1, 4),
                        "labels": np.array([label[ann["category_id"]] for _, ann in instances], np.int64),
                        "masks": [coco.annToRLE(ann) for _, ann in instances] if masks else None,
                        "dropped": [f"annotation {a.get('id')} of image {image_id}" for b, a in zip(boxes, annotations)
                                    if b is None]})
    return {"records": records, "classes": [coco.cats[c]["name"] for c in category_ids], "category_ids": category_ids,
            "coco": coco}


def coco_box(ann, info, label, json_file, masks):
    """A non-crowd annotation's box as [x1, y1, x2, y2] clipped to the image, None without area. A broken box, an
    unknown category or (for the mask models) no segmentation is refused, naming the annotation."""
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
        raise ValueError(f"{json_file}: annotation {ann.get('id')} (image {info['id']}) has bbox {bbox}: give 4 "
                         "finite numbers [x, y, width, height]; fix or remove the annotation")
    if ann.get("category_id") not in label:
        raise ValueError(f"{json_file}: annotation {ann.get('id')} (image {info['id']}) has category_id "
                         f"{ann.get('category_id')!r}, which is not among the categories {sorted(label)}")
    x, y, w, h = bbox
    box = clip_box([x, y, x + w, y + h], info["width"], info["height"])
    if box is not None and masks and not ann.get("segmentation"):
        raise ValueError(f"{json_file}: annotation {ann.get('id')} has no segmentation, which the mask models need; "
                         "use faster-c4")
    return box


def clip_box(box, width, height):
    """[x1, y1, x2, y2] clipped to the image; None without area there (zero-size, inverted or outside the image):
    Detectron2 clips every dataset's boxes and drops those (filter_empty_instances)."""
    x1, x2 = (min(max(v, 0), width) for v in box[0::2])
    y1, y2 = (min(max(v, 0), height) for v in box[1::2])
    return [x1, y1, x2, y2] if x2 > x1 and y2 > y1 else None


def decode_masks(rles):
    """COCO RLEs -> uint8 masks [N, H, W]."""
    with warnings.catch_warnings():  # pycocotools' own use of numpy's __array__ protocol
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1)


class DetectionImages(torch.utils.data.Dataset):
    """Records -> (uint8 image [3, H, W], target {boxes, labels[, masks]}, record index); the model resizes them.
    Training items are keyed (epoch, index) and flipped (p 0.5) by a generator seeded with (seed, epoch, index), so
    a resumed run replays the flips. Test items are keyed by index, unflipped."""

    def __init__(self, records, train, seed=0, masks=False):
        self.records, self.train, self.seed, self.masks = records, train, seed, masks

    def __getitem__(self, key):
        epoch, index = key if self.train else (None, key)
        record = self.records[index]
        try:
            with PILImage.open(record["file"]) as handle:
                image = torch.from_numpy(np.asarray(intl.to_rgb(handle), dtype=np.uint8).copy()).permute(2, 0, 1)
        except Exception as error:  # PIL raises many types on corrupt data
            raise intl.UnreadableImageError(f"Cannot read image {record['file']}: {error}") from error
        target = {key: torch.from_numpy(record[key].copy()) for key in ("boxes", "labels")}
        if self.masks:
            target["masks"] = decode_masks(record["masks"])
        flip = torch.Generator().manual_seed(hash((self.seed, epoch, index)) % 2**63)
        if self.train and torch.rand(1, generator=flip).item() < 0.5:
            x1, y1, x2, y2 = target["boxes"].unbind(1)
            width = image.shape[-1]
            image, target["boxes"] = image.flip(-1), torch.stack([width - x2, y1, width - x1, y2], dim=1)
            if self.masks:
                target["masks"] = target["masks"].flip(-1)
        return image, target, index


def collate(batch):
    return tuple(zip(*batch))


def epoch_batches(landscape, global_batch, seed, epoch):
    """One epoch's global training batches, as lists of record indices: a permutation from (seed, epoch), landscape
    and portrait images batched apart (Detectron2's aspect-ratio grouping: a batch pads little), the batches ordered
    by their first image's place in the permutation. Every epoch has as many batches."""
    order = intl.epoch_order(len(landscape), seed, epoch).numpy()
    batches = []  # of places in `order`
    for orientation in (True, False):
        places = np.flatnonzero(landscape[order] == orientation)
        batches += [places[s:s + global_batch] for s in range(0, len(places) - global_batch + 1, global_batch)]
    return [order[batch].tolist() for batch in sorted(batches, key=lambda b: b[0])]


def process_batches(landscape, config, num_processes, rank, start):
    """Process `rank`'s share of the global batches from iteration `start` on, epoch after epoch without end, as lists
    of keys (epoch, index): iteration i is always the same batch, so a resumed run goes on as an uninterrupted one."""
    share = intl.per_process_batch(config.batch_size, num_processes)
    per_epoch = len(epoch_batches(landscape, config.batch_size, config.seed, 0))
    if per_epoch == 0:
        raise ValueError(f"{len(landscape)} training images do not fill one global batch of {config.batch_size} "
                         "images of one orientation: lower --batch_size")
    for epoch in itertools.count(start // per_epoch):
        done = max(0, start - epoch * per_epoch)  # the batches of this epoch a resumed run has done
        for batch in epoch_batches(landscape, config.batch_size, config.seed, epoch)[done:]:
            yield [(epoch, index) for index in batch[rank * share:(rank + 1) * share]]


def training_batches(train_records, config, accelerator, start):
    """This process's training batches from iteration `start` on, without end, on the device."""
    landscape = np.array([r["width"] >= r["height"] for r in train_records])
    keys = process_batches(landscape, config, accelerator.num_processes, accelerator.process_index, start)
    dataset = DetectionImages(train_records, train=True, seed=config.seed, masks=has_masks(config))
    # Its own generator: the loader must not draw from the global RNG, which a resumed run restores.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, num_workers=config.num_workers,
                                         collate_fn=collate, pin_memory=accelerator.device.type == "cuda",
                                         generator=torch.Generator().manual_seed(config.seed))
    for images, targets, _ in loader:
        yield to_device(images, targets, accelerator.device)


def to_device(images, targets, device):
    """uint8 images -> floats in [0, 1] on the device (the model normalises them), and their targets."""
    images = [image.to(device, non_blocking=True).float().div_(255) for image in images]
    return images, [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(model, records, config, accelerator):
    """Detections of every test image (process r takes every n-th from the r-th), gathered on every process in image
    order: [{"index", "boxes" [D, 4] in the image's pixels, "scores", "labels"(, "masks": RLEs)}]."""
    model.eval()
    shard = list(range(accelerator.process_index, len(records), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(DetectionImages(records, train=False), batch_size=config.eval_batch_size,
                                         sampler=shard, num_workers=config.num_workers, collate_fn=collate)
    predictions = []
    for images, _, indices in tqdm(loader, desc="evaluation", leave=False, disable=not accelerator.is_main_process):
        outputs = model(to_device(images, (), accelerator.device)[0])
        for index, out in zip(indices, outputs):
            prediction = {"index": index, "boxes": out["boxes"].float().cpu().numpy(),
                          "scores": out["scores"].float().cpu().numpy(), "labels": out["labels"].cpu().numpy()}
            if has_masks(config):
                prediction["masks"] = encode_masks(out["masks"][:, 0] > 0.5)
            predictions.append(prediction)
    model.train()
    return sorted(gather_object(predictions), key=lambda p: p["index"])  # the shards are disjoint and cover all


def encode_masks(masks):
    """bool [N, H, W] -> COCO compressed RLEs (counts as str, JSON-able)."""
    rles = mask_utils.encode(np.asfortranarray(masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def voc_class_ap(detections, ground_truth, iou_threshold):
    """One class's VOC07 11-point AP (the papers' metric) by the VOC devkit's rules; nan when the class has no object.

    detections: [(image key, score, box)], taken by decreasing score; ground_truth: {image key: (boxes [G, 4],
    difficult [G])}; boxes in the devkit's inclusive pixel coordinates. A detection whose best-overlapping object
    has IoU > threshold (strictly) is a true positive the first time, ignored if that object is difficult, and a
    false positive otherwise. Difficult objects do not count towards recall.
    """
    ground_truth = {key: (np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(difficult, bool))
                    for key, (boxes, difficult) in ground_truth.items()}
    positives = sum(int((~difficult).sum()) for _, difficult in ground_truth.values())
    if positives == 0:
        return float("nan")
    matched = {key: np.zeros(len(boxes), bool) for key, (boxes, _) in ground_truth.items()}
    tp, fp = np.zeros(len(detections)), np.zeros(len(detections))
    for rank, (key, _, box) in enumerate(sorted(detections, key=lambda d: -d[1])):
        boxes, difficult = ground_truth.get(key, (np.zeros((0, 4)), np.zeros(0, bool)))
        overlaps = devkit_iou(np.asarray(box, np.float64), boxes)
        best = int(np.argmax(overlaps)) if len(boxes) else None
        if best is not None and overlaps[best] > iou_threshold:
            if difficult[best]:
                continue  # neither a hit nor a miss
            tp[rank], fp[rank] = not matched[key][best], matched[key][best]
            matched[key][best] = True
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall, precision = tp / positives, tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    # The mean of the best precision at recall >= 0, 0.1, ..., 1.
    return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                          for t in np.linspace(0, 1, 11)]))


def devkit_iou(box, boxes):
    """IoU of one box with boxes [G, 4], in inclusive pixel coordinates (each side counts one pixel more)."""
    iw = (np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + 1).clip(min=0)
    ih = (np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + 1).clip(min=0)
    inter = iw * ih
    return inter / ((box[2] - box[0] + 1) * (box[3] - box[1] + 1)
                    + (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1) - inter)


def voc_evaluate(predictions, records, classes):
    """Detectron2's PascalVOCDetectionEvaluator numbers (x100): AP = the mean over IoU 0.50:0.05:0.95 of the mean
    over classes of the class AP; AP50; AP75; AP50 per class. Classes without a test object are left out.
    `predictions` come in image order, as the evaluator writes them to its detection files."""
    per_class = {}
    for c, name in enumerate(classes, start=1):
        # The devkit's 1-based inclusive pixel coordinates: x1 and y1 + 1.
        ground_truth = {i: (r["boxes"][chosen].astype(np.float64) + [1, 1, 0, 0], r["difficult"][chosen])
                        for i, r in enumerate(records) for chosen in [r["labels"] == c]}
        detections = [(p["index"], score, box) for p in predictions
                      for score, box in as_written_to_detection_files(p["scores"][p["labels"] == c],
                                                                      p["boxes"][p["labels"] == c])]
        per_class[name] = [voc_class_ap(detections, ground_truth, t) for t in IOU_THRESHOLDS]
    evaluated = {name: aps for name, aps in per_class.items() if not math.isnan(aps[0])}  # some: load_split checked
    table = np.array(list(evaluated.values())) * 100  # [classes, thresholds]
    return {"AP": float(table.mean()), "AP50": float(table[:, 0].mean()), "AP75": float(table[:, 5].mean()),
            "per_class_AP50": {name: float(ap[0] * 100) for name, ap in evaluated.items()}, "metric": "VOC07 11-point"}


def as_written_to_detection_files(scores, boxes):
    """One class's detections of one image as the published VOC numbers saw them: [(score, devkit box)].

    Detectron2's evaluator writes them to text files, the score as "{:.3f}" and the corners as "{:.1f}" (devkit
    coordinates: x1 and y1 + 1, in float32), which the devkit's voc_eval reads back: scores tie at 3 decimals and
    IoUs near a threshold cross it, moving AP50 by up to a point on small test sets. Ties keep the order the files
    are written in, image by image (a stable sort): voc_eval's np.argsort is unstable, so no fixed order reproduces
    its ties on every numpy version and CPU.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    boxes[:, :2] += 1  # in float32, as Detectron2 adds 1 to the float32 corners before writing them
    return [(float(f"{float(score):.3f}"), np.array([float(f"{float(v):.1f}") for v in box]))
            for score, box in zip(scores, boxes)]


def coco_evaluate(predictions, records, coco, category_ids, iou_types=("bbox",)):
    """pycocotools' COCOeval of the predictions (labels mapped back to the json's category ids) -> AP, AP50, AP75,
    APs, APm, APl (x100) per IoU type; None where the test set has no object of that size. No detection at all
    gives 0 (COCOeval cannot load an empty result)."""
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    results = {}
    for iou_type in iou_types:
        detections = []
        for p in predictions:
            boxes = p["boxes"].copy()
            boxes[:, 2:] -= boxes[:, :2]  # [x, y, width, height]
            shapes = boxes.tolist() if iou_type == "bbox" else [dict(rle) for rle in p["masks"]]
            for shape, score, label in zip(shapes, p["scores"].tolist(), p["labels"].tolist()):
                detections.append({"image_id": records[p["index"]]["image_id"], "category_id": category_ids[label - 1],
                                   "score": score, "bbox" if iou_type == "bbox" else "segmentation": shape})
        if not detections:
            results[iou_type] = {name: 0.0 for name in names}
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            evaluation = COCOeval(coco, coco.loadRes(detections), iou_type)
            evaluation.params.imgIds = sorted({r["image_id"] for r in records})
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        # COCOeval's -1 means no ground truth of that size: None (null in the JSON), as Detectron2's NaN.
        results[iou_type] = {name: float(v * 100) if v >= 0 else None for name, v in zip(names, evaluation.stats[:6])}
    return results


if __name__ == "__main__":
    intl.run(main, interrupted="interrupted; if OUTPUT_DIR holds a checkpoint, continue with --resume latest")
