"""Detection transfer of a pretrained backbone: Faster / Mask R-CNN on VOC and COCO, on torchvision alone.

    python detect_transfer.py --preset voc-c4-24k --backbone runs/in1k/backbone --data_root /data/voc \\
        --output_dir runs/voc                                           # VOC07+12 trainval -> VOC07 test
    accelerate launch --multi_gpu --num_processes 8 detect_transfer.py --preset coco-c4-2x \\
        --backbone runs/in1k/backbone --data_root /data/coco --output_dir runs/coco
    python detect_transfer.py --eval_only --resume runs/voc/checkpoints/step-00024000 --data_root /data/voc
    python detect_transfer.py --benchmark 2 --arch resnet50 --model faster-c4      # seconds per iteration, no data

The papers (INTL, CW-RGP) follow MoCo's protocol with Detectron2: ResNet-50-C4, every layer
fine-tuned with synchronised BatchNorm. Detectron2 is not on PyPI, so the same models are built here
from torchvision's detection parts:

    faster-c4 / mask-c4    res2..res4 (stride 16) -> single-level RPN, anchors 32..512 x (0.5, 1, 2);
                           RoIAlign 14 x 14 at 1/16 with aligned=True -> res5 + an extra BatchNorm2d ->
                           average pool -> box predictor (and, for masks, res5's 7 x 7 maps -> a 2 x 2
                           deconvolution -> per-class 14 x 14 masks); res5 runs once per RoI in training
    faster-fpn / mask-fpn  torchvision's FPN models (TwoMLPHead, 4-conv mask head), BN trainable, the
                           same aligned RoIAlign

Known differences from Detectron2 (torchvision's parts are used as they are; their effect on the
papers' numbers has not been measured): the box losses are smooth L1 with beta 1/9 (Detectron2: L1),
the box predictor has 4 (K + 1) outputs with an unused background slot (Detectron2: 4 K), mask targets
are cut from full-image masks by RoIAlign (Detectron2: from polygons), images are resized as normalised
float tensors and padded to a multiple of 32 (Detectron2 C4: no padding), the RPN drops boxes smaller
than 1e-3 pixels. BatchNorm becomes SyncBatchNorm only with several GPUs; with several CPU processes
each process normalises its own batch.

Evaluation: VOC by the Detectron2 / MoCo numbers (per class VOC07 11-point AP at IoU 0.50:0.05:0.95
with the devkit's conventions, averaged -> AP; AP50; AP75; scores and box corners rounded as Detectron2's
detection files hold them), computed by `voc_evaluate` below; COCO
by pycocotools' COCOeval (bbox, and segm for the mask models). OUTPUT_DIR receives checkpoints/,
log.jsonl and results.json.
"""

import argparse
import bisect
import contextlib
import io
import json
import math
import os
import resource
import sys
import time
import warnings
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from PIL import Image as PILImage
from safetensors.torch import load_file
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_inference, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, roi_align
from tqdm.auto import tqdm

import intl

MODELS = ("faster-c4", "mask-c4", "faster-fpn", "mask-fpn")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50:0.05:0.95

# The papers' (MoCo's Detectron2) recipes, for a global batch of 16. A preset sets these values; any explicit flag wins.
PRESETS = {
    "voc-c4-24k": dict(dataset="voc", model="faster-c4", iterations=24000, lr_steps=[18000, 22000], warmup_iters=100,
                       lr=0.02, reference_batch=16, train_sizes=list(range(480, 801, 32)), test_size=800,
                       max_size=1333),
    "coco-c4-2x": dict(dataset="coco", model="mask-c4", iterations=180000, lr_steps=[120000, 160000],
                       warmup_iters=1000, lr=0.02, reference_batch=16, train_sizes=list(range(640, 801, 32)),
                       test_size=800, max_size=1333),
}
# Detectron2's RPN and pooler settings of its C4 and FPN configurations (flags left at None take these).
ARCH_DEFAULTS = {
    "c4": dict(rpn_pre_nms_train=12000, rpn_post_nms_train=2000, rpn_pre_nms_test=6000, rpn_post_nms_test=1000,
               pool_size=14),
    "fpn": dict(rpn_pre_nms_train=2000, rpn_post_nms_train=1000, rpn_pre_nms_test=1000, rpn_post_nms_test=1000,
                pool_size=7),
}
# Flags that only steer the run, not what it computes: a resumed run may change them, and keeps their saved values
# when they are not given again.
RUN_CONTROL = {"output_dir", "resume", "eval_only", "print_config", "num_workers", "log_every", "save_every", "keep",
               "stop_after_iters", "benchmark", "benchmark_size", "data_root", "train_json", "train_images",
               "test_json", "test_images", "eval_batch_size", "overwrite"}
# Of those, the ones that say what this one command does: never taken from the checkpoint.
PER_COMMAND = {"output_dir", "resume", "eval_only", "print_config", "stop_after_iters", "benchmark", "benchmark_size",
               "overwrite"}
# What a training run writes into --output_dir: a new run there must not mix with, nor replace, an earlier run's.
RESULTS = ("checkpoints", "log.jsonl", "results.json")
# The valid range of every numeric flag (intl.check_ranges), checked before any work.
RANGES = {"seed": "[0, 4294967295]", "train_sizes": "[1, inf)", "test_size": "[1, inf)", "max_size": "[1, inf)",
          "mean": "(-inf, inf)", "std": "(0, inf)", "num_workers": "[0, inf)", "anchor_sizes": "[1, inf)",
          "rpn_pre_nms_train": "[1, inf)", "rpn_post_nms_train": "[1, inf)", "rpn_pre_nms_test": "[1, inf)",
          "rpn_post_nms_test": "[1, inf)", "rpn_batch_per_image": "[1, inf)", "roi_batch_per_image": "[1, inf)",
          "pool_size": "[1, inf)", "score_thresh": "[0, 1]", "detections_per_image": "[1, inf)",
          "batch_size": "[1, inf)", "reference_batch": "[1, inf)", "iterations": "[1, inf)", "lr": "(0, inf)",
          "lr_steps": "[0, inf)", "warmup_iters": "[0, inf)", "warmup_factor": "[0, 1]", "weight_decay": "[0, inf)",
          "momentum": "[0, 1)", "precise_bn": "[0, inf)", "save_every": "[1, inf)", "keep": "[1, inf)",
          "eval_batch_size": "[1, inf)", "stop_after_iters": "[1, inf)", "log_every": "[1, inf)",
          "benchmark": "[0, inf)", "benchmark_size": "[1, inf)"}


def get_parser():
    parser = argparse.ArgumentParser(description="Detection transfer: Faster / Mask R-CNN (C4 or FPN) on VOC or COCO",
                                     allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="the papers' recipes: voc-c4-24k (Faster R-CNN C4, VOC07+12 -> VOC07 test) or "
                             "coco-c4-2x (Mask R-CNN C4, COCO 2017, 2x schedule)")
    parser.add_argument("--print_config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head initialisation, data order and flips")

    # Data
    parser.add_argument("--dataset", type=str, default=None, choices=["voc", "coco"],
                        help="voc: VOC-format folders under --data_root; coco: COCO-format json + image folder")
    parser.add_argument("--data_root", type=str, default=None,
                        help="voc: the folder holding VOCdevkit/; coco: the folder holding annotations/, train2017/ "
                             "and val2017/ (the defaults of --train_json etc.)")
    parser.add_argument("--train_sets", type=str, default="2007-trainval,2012-trainval",
                        help="voc: YEAR-IMAGESET pairs trained on, joined by commas")
    parser.add_argument("--test_set", type=str, default="2007-test", help="voc: the YEAR-IMAGESET evaluated on")
    parser.add_argument("--voc_classes", type=str, default=",".join(VOC_CLASSES),
                        help="voc: the class names, in label order (another VOC-format dataset may have its own)")
    parser.add_argument("--voc_metric", type=str, default="11point", choices=["11point", "area"],
                        help="voc: AP as the mean precision at 11 recall points (VOC07, the papers') or the area "
                             "under the interpolated precision-recall curve (VOC2010+)")
    parser.add_argument("--train_json", type=str, default=None,
                        help="coco: training annotations (default DATA_ROOT/annotations/instances_train2017.json)")
    parser.add_argument("--train_images", type=str, default=None,
                        help="coco: training image folder (default DATA_ROOT/train2017)")
    parser.add_argument("--test_json", type=str, default=None,
                        help="coco: test annotations (default DATA_ROOT/annotations/instances_val2017.json)")
    parser.add_argument("--test_images", type=str, default=None,
                        help="coco: test image folder (default DATA_ROOT/val2017)")
    parser.add_argument("--train_sizes", type=int, nargs="+", default=list(range(480, 801, 32)),
                        help="training short sides in pixels, one drawn per image")
    parser.add_argument("--test_size", type=int, default=800, help="test short side in pixels")
    parser.add_argument("--max_size", type=int, default=1333, help="cap on the long side in pixels")
    parser.add_argument("--mean", type=float, nargs=3, default=None,
                        help="input normalisation mean, RGB in [0, 1] (default: the backbone's)")
    parser.add_argument("--std", type=float, nargs=3, default=None,
                        help="input normalisation std (default: the backbone's)")
    parser.add_argument("--num_workers", type=int, default=4, help="data loader processes per training process")

    # Model
    parser.add_argument("--model", type=str, default="faster-c4", choices=MODELS,
                        help="faster/mask R-CNN with the papers' ResNet-C4 or torchvision's FPN")
    parser.add_argument("--backbone", type=str, default=None,
                        help="an export folder, a .safetensors file (+ --arch), a Hub id owner/name[@revision], a "
                             "pretrain checkpoint folder, an official .pth.tar, or 'random' (from scratch, --arch)")
    parser.add_argument("--arch", type=str, default=None, choices=intl.RESNETS,
                        help="the ResNet, when the backbone source does not say (required with 'random')")
    parser.add_argument("--revision", type=str, default=None, help="Hub branch, tag or commit of --backbone")
    parser.add_argument("--anchor_sizes", type=int, nargs="+", default=[32, 64, 128, 256, 512],
                        help="anchor sides in pixels (C4: all on the one level; FPN: one per level)")
    parser.add_argument("--rpn_pre_nms_train", type=int, default=None,
                        help="proposals kept before NMS per level in training (default: C4 12000, FPN 2000)")
    parser.add_argument("--rpn_post_nms_train", type=int, default=None,
                        help="proposals kept after NMS per image in training (default: C4 2000, FPN 1000)")
    parser.add_argument("--rpn_pre_nms_test", type=int, default=None,
                        help="proposals kept before NMS per level at test time (default: C4 6000, FPN 1000)")
    parser.add_argument("--rpn_post_nms_test", type=int, default=None,
                        help="proposals kept after NMS per image at test time (default: 1000)")
    parser.add_argument("--rpn_batch_per_image", type=int, default=256, help="anchors sampled per image for the RPN loss")
    parser.add_argument("--roi_batch_per_image", type=int, default=512, help="RoIs sampled per image for the head losses")
    parser.add_argument("--pool_size", type=int, default=None,
                        help="RoIAlign output side (default: C4 14, pooled before res5; FPN 7 for boxes; FPN masks 14)")
    parser.add_argument("--score_thresh", type=float, default=0.05, help="test: detections below this score are dropped")
    parser.add_argument("--detections_per_image", type=int, default=100, help="test: detections kept per image")

    # Optim (iteration based; --lr, --iterations, --lr_steps and --warmup_iters are for a global batch of
    # --reference_batch: another global batch B scales the lr by B / reference and the iterations by reference / B)
    parser.add_argument("--batch_size", type=int, default=2, help="images per process per iteration")
    parser.add_argument("--reference_batch", type=int, default=16,
                        help="the global batch the lr and iteration counts are given for")
    parser.add_argument("--iterations", type=int, default=24000, help="training iterations at the reference batch")
    parser.add_argument("--lr", type=float, default=0.02, help="peak learning rate at the reference batch")
    parser.add_argument("--lr_steps", type=int, nargs="*", default=[18000, 22000],
                        help="iterations (at the reference batch) after which the lr is multiplied by 0.1")
    parser.add_argument("--warmup_iters", type=int, default=100,
                        help="linear warm-up iterations (at the reference batch)")
    parser.add_argument("--warmup_factor", type=float, default=0.001, help="the warm-up starts at this fraction of the lr")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="weight decay (none on normalisation parameters)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--precise_bn", type=int, default=200,
                        help="before the final evaluation, set every BatchNorm's statistics to the mean over this "
                             "many training batches per process (0: off)")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="autocast precision (default: Accelerate's config)")

    # Checkpoints and evaluation
    parser.add_argument("--output_dir", type=str, default=None, help="where checkpoints, log.jsonl and results.json go")
    parser.add_argument("--save_every", type=int, default=2000, help="save a checkpoint every N iterations (and at the end)")
    parser.add_argument("--keep", type=int, default=2, help="keep the last K checkpoints")
    parser.add_argument("--resume", type=str, default=None,
                        help="'latest' (in --output_dir) or a checkpoint folder: continue exactly where it stopped")
    parser.add_argument("--eval_only", action="store_true",
                        help="evaluate the --resume checkpoint on the test set and write results.json (default "
                             "folder: OUTPUT_DIR/eval/step-N of the checkpoint's run)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let a new run (or --eval_only) replace what an earlier run left in --output_dir: its "
                             "checkpoints/, log.jsonl and results.json are deleted first. Without it such a folder "
                             "is refused")
    parser.add_argument("--eval_batch_size", type=int, default=1, help="test images per process per forward pass")
    parser.add_argument("--stop_after_iters", type=int, default=None,
                        help="save and stop after this many iterations; the schedule still spans all of them")

    # Logging
    parser.add_argument("--log_every", type=int, default=20, help="log the losses and the lr every N iterations")
    parser.add_argument("--benchmark", type=int, default=0,
                        help="time N training iterations of --model on random images and print seconds per "
                             "iteration and peak memory; no data needed")
    parser.add_argument("--benchmark_size", type=int, nargs=2, default=[800, 1067], metavar=("H", "W"),
                        help="the benchmark's image size (the model resizes it to the test size)")
    return parser


def main(argv=None):
    config = resolve_config(argv)
    if config.print_config:
        print(json.dumps(vars(config), indent=2))
        return
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    if warning := intl.slow_precision_warning(accelerator):
        print(warning, file=sys.stderr)
    if config.benchmark:
        return benchmark(config, accelerator)
    say = tqdm.write if accelerator.is_main_process else (lambda *_: None)
    output_dir = Path(config.output_dir)
    prepare_output_dir(config, output_dir, accelerator, say)
    global_batch = config.batch_size * accelerator.num_processes
    plan = schedule(config, global_batch)

    # Data: training records (not needed to evaluate a checkpoint) and test records with their ground truth.
    test = load_test_data(config)
    train = None if config.eval_only else load_train_data(config)

    # Model: the backbone loaded strictly from its source; a resumed run takes every weight from its checkpoint.
    checkpoint = intl.find_checkpoint(config.resume, output_dir, "detection") if config.resume else None
    set_seed(config.seed)
    backbone, backbone_input = load_detection_backbone(config, random=checkpoint is not None)
    config = argparse.Namespace(**{**vars(config), **backbone_input})  # its arch, and its mean / std unless given
    model = build_detector(config, backbone, len(test["classes"]))
    if checkpoint is not None and config.eval_only:
        problem = intl.checkpoint_problem(checkpoint)
        if problem:
            raise ValueError(f"--resume {config.resume}: {problem}; evaluate another checkpoint")
        weights = load_file(checkpoint / "model.safetensors")
        intl.check_finite(weights, f"the weights of {checkpoint}")
        model.load_state_dict(weights, strict=True)
    model = intl.sync_batchnorm(model, accelerator).to(accelerator.device)
    say(f"{accelerator.num_processes} process(es) on {accelerator.device}; {config.model} on {config.arch}; "
        f"{len(test['classes'])} classes")

    if config.eval_only:
        state = intl.read_json(checkpoint / "trainer_state.json")
        return finish(model, test, config, accelerator, output_dir, state, say)

    set_seed(config.seed, device_specific=True)
    model, optimizer = accelerator.prepare(model, build_optimizer(model, config))
    iteration, state = 0, {"iteration": 0, "precise_bn_done": False}
    if checkpoint is not None:
        def check_state(folder, saved):
            if not isinstance(saved.get("iteration"), int):
                raise ValueError(f"{folder / 'trainer_state.json'} holds no iteration count: the file is damaged; "
                                 "resume from another checkpoint")

        checkpoint, state = intl.load_checkpoint(accelerator, config.resume, output_dir, "detection",
                                                 check_state=check_state, say=say)
        iteration = state["iteration"]
        if accelerator.is_main_process:
            intl.truncate_jsonl(output_dir / "log.jsonl", iteration, key="iteration")
        say(f"resumed from {checkpoint} at iteration {iteration}")
    elif accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "log.jsonl").write_text("")
    say(f"{len(train['records'])} training images, {len(test['records'])} test images; global batch {global_batch}, "
        f"{plan['iterations']} iterations, peak lr {plan['lr']:.4g}, lr x0.1 after {plan['steps']}, "
        f"warm-up {plan['warmup']}")

    stop_at = plan["iterations"] if config.stop_after_iters is None else min(plan["iterations"], config.stop_after_iters)
    if iteration < stop_at:
        iteration = train_loop(model, optimizer, train, plan, iteration, stop_at, config, accelerator, output_dir)
        state = {"iteration": iteration, "precise_bn_done": False}
    if iteration < plan["iterations"]:
        return  # --stop_after_iters: the checkpoint is saved; continue with --resume
    if config.precise_bn and not state.get("precise_bn_done"):
        say(f"precise BN: BatchNorm statistics over {config.precise_bn} training batches per process")
        precise_bn(accelerator.unwrap_model(model), training_batches(train, config, accelerator, iteration,
                                                                     config.precise_bn), accelerator)
        state = {"iteration": iteration, "precise_bn_done": True}
        save_checkpoint(accelerator, config, state, output_dir)
    finish(accelerator.unwrap_model(model), test, config, accelerator, output_dir, state, say)
    accelerator.end_training()


def finish(model, test, config, accelerator, output_dir, state, say):
    """Evaluate on the test set, print the table and write OUTPUT_DIR/results.json."""
    tic = time.time()
    predictions = predict(model, test["records"], config, accelerator)
    if not accelerator.is_main_process:
        return None
    results = evaluate_predictions(predictions, test, config)
    results.update(dataset=config.dataset, test_set=test["name"], test_images=len(test["records"]), model=config.model,
                   arch=config.arch, backbone=config.backbone, iterations=state["iteration"],
                   precise_bn=bool(state.get("precise_bn_done")), eval_seconds=round(time.time() - tic, 1))
    intl.write_text_atomically(output_dir / "results.json", json.dumps(results, indent=2) + "\n")
    say(results_table(results))
    return results


def prepare_output_dir(config, output_dir, accelerator, say):
    """Before any work: a new training run (or one continued from another folder's checkpoint) must not mix with,
    nor replace, what an earlier run left in output_dir, and --eval_only must not replace its results.json, unless
    --overwrite (which deletes them first). The folders of interrupted checkpoint saves are removed."""
    if config.eval_only:
        intl.refuse_to_replace(output_dir, ["results.json"], config.overwrite)
    elif not (config.resume and intl.find_checkpoint(config.resume, output_dir, "detection").resolve().parent
              == (output_dir / "checkpoints").resolve()):
        found = intl.refuse_to_replace(output_dir, RESULTS, config.overwrite,
                                       " (or continue the earlier run with --resume latest)")
        if found and accelerator.is_main_process:
            intl.remove_results(output_dir, found)
            say(f"--overwrite: removed {', '.join(found)} of the earlier run in {output_dir}")
    if accelerator.is_main_process:
        for name in intl.remove_interrupted_saves(output_dir / "checkpoints"):
            say(f"removed {output_dir / 'checkpoints' / name}, left by an interrupted save")
    accelerator.wait_for_everyone()


# -----------------------------------------------------------------------------
# Configuration


def resolve_config(argv=None):
    """Flags > preset > argparse defaults; a resumed run keeps its checkpoint's configuration."""
    parser = get_parser()
    config = parser.parse_args(argv)
    explicit = intl.explicit_flags(parser, argv)
    if config.preset:
        for key, value in PRESETS[config.preset].items():
            if key not in explicit:
                setattr(config, key, value)
    if config.eval_only and not config.resume:
        raise ValueError("--eval_only needs --resume CHECKPOINT (or 'latest' with --output_dir) to say what to evaluate")
    if config.resume:
        checkpoint = intl.find_checkpoint(config.resume, config.output_dir, "detection")
        intl.keep_resumed_config(config, explicit, checkpoint, RUN_CONTROL, PER_COMMAND)
        if config.output_dir is None:  # OUTPUT_DIR/checkpoints/step-N -> OUTPUT_DIR (--eval_only: OUTPUT_DIR/eval/step-N)
            run_dir = checkpoint.resolve().parent.parent
            config.output_dir = str(run_dir / "eval" / checkpoint.name if config.eval_only else run_dir)
    for key, value in ARCH_DEFAULTS[config.model.split("-")[1]].items():
        if getattr(config, key) is None:
            setattr(config, key, value)
    if config.benchmark:
        config.arch = config.arch or "resnet50"
    check_config(config)
    return config


def check_config(config):
    intl.check_ranges(config, RANGES)
    if config.benchmark or config.print_config:
        return
    if config.output_dir is None:
        raise ValueError("--output_dir is required: it receives checkpoints, log.jsonl and results.json")
    intl.check_output_dir(config.output_dir)
    if config.dataset is None:
        raise ValueError("--dataset is required (voc or coco), or a --preset that names it")
    if config.data_root is None:
        needed = ["test_json", "test_images"] + ([] if config.eval_only else ["train_json", "train_images"])
        if config.dataset == "voc" or any(getattr(config, k) is None for k in needed):
            raise ValueError(f"--data_root is required for --dataset {config.dataset}: " + (
                "the folder holding VOCdevkit/" if config.dataset == "voc" else "the folder holding annotations/, "
                "train2017/ and val2017/ (or give --train_json, --train_images, --test_json and --test_images)"))
    if config.backbone is None and not config.resume:
        raise ValueError("--backbone is required: an export folder, a .safetensors file, a Hub id, a pretrain "
                         "checkpoint, an official .pth.tar, or 'random' with --arch")
    if config.backbone == "random" and config.arch is None:
        raise ValueError("--backbone random needs --arch (e.g. resnet50)")
    if config.dataset == "voc" and config.model.startswith("mask"):
        raise ValueError(f"--model {config.model} needs instance masks, which VOC detection annotations do not "
                         "have: use faster-c4 or faster-fpn on VOC, or a COCO-format dataset with segmentations")
    if config.model.endswith("fpn") and len(config.anchor_sizes) != 5:
        raise ValueError(f"--anchor_sizes: the FPN has 5 levels (P2-P6), one anchor size each; got "
                         f"{len(config.anchor_sizes)}")
    if sorted(config.lr_steps) != list(config.lr_steps):
        raise ValueError(f"--lr_steps {config.lr_steps}: give increasing iteration counts")


def schedule(config, global_batch):
    """The run's lr and iteration counts: the flags are for --reference_batch; the global batch scales them
    (linear lr scaling, iterations inversely), so the run sees the same number of images."""
    factor = config.reference_batch / global_batch
    return {"lr": config.lr / factor, "iterations": max(1, round(config.iterations * factor)),
            "steps": [round(s * factor) for s in config.lr_steps], "warmup": round(config.warmup_iters * factor),
            "warmup_factor": config.warmup_factor}


def learning_rate(iteration, plan):
    """Detectron2's WarmupMultiStepLR, stepped once per global iteration: a linear ramp from warmup_factor x lr
    over the warm-up, then x0.1 after each step (from the step's iteration on)."""
    factor = 1.0
    if iteration < plan["warmup"]:
        alpha = iteration / plan["warmup"]
        factor = plan["warmup_factor"] * (1 - alpha) + alpha
    return plan["lr"] * factor * 0.1 ** bisect.bisect_right(plan["steps"], iteration)


# -----------------------------------------------------------------------------
# Models: R50-C4 as in the papers (Detectron2's Res5ROIHeads), and torchvision's FPN models


class AlignedRoIAlign(MultiScaleRoIAlign):
    """RoIAlign with aligned=True (the half-pixel shift of Detectron2's ROIAlignV2) on one or more levels.

    A subclass of torchvision's MultiScaleRoIAlign (which calls roi_align with aligned=False) because
    FasterRCNN and MaskRCNN type-check their poolers. The levels' scales are given, not inferred from
    the padded batch; with several levels, a box of side s goes to level floor(4 + log2(s / 224)),
    clamped to the available levels (the FPN paper's eq. 1).
    """

    def __init__(self, featmap_names, output_size, scales, sampling_ratio=0):
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.level_scales = [float(s) for s in scales]

    def forward(self, x, boxes, image_shapes):
        features = [x[name] for name in self.featmap_names]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        if len(features) == 1:
            return roi_align(features[0], rois, self.output_size, self.level_scales[0], self.sampling_ratio,
                             aligned=True)
        levels = self.levels(rois[:, 1:])
        out = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.level_scales)):
            chosen = torch.where(levels == level)[0]
            out[chosen] = roi_align(feature, rois[chosen], self.output_size, scale, self.sampling_ratio,
                                    aligned=True).to(out.dtype)
        return out

    def levels(self, boxes):
        """The index of the level each box [N, 4] is pooled from."""
        k_min = round(-math.log2(self.level_scales[0]))
        k_max = k_min + len(self.level_scales) - 1
        side = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
        level = torch.floor(self.canonical_level + torch.log2(side / self.canonical_scale + 1e-8))
        return (level.clamp(k_min, k_max) - k_min).to(torch.int64)

    def __repr__(self):
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"scales={self.level_scales}, sampling_ratio={self.sampling_ratio}, aligned=True)")


class ResNetC4(nn.Sequential):
    """res2..res4 of a torchvision ResNet (stem, layer1-3): stride 16, out_channels = res4's width (1024 for R50).

    The children keep torchvision's names, so the keys are the ResNet's: backbone.conv1.weight, backbone.layer3...
    """

    def __init__(self, resnet):
        super().__init__(OrderedDict((name, getattr(resnet, name)) for name in
                                     ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")))
        self.out_channels = stage_widths(resnet)[2]


class Res5Head(nn.Module):
    """The C4 box head: res5 (the ResNet's layer4, stride 2: 14 x 14 RoIs -> 7 x 7) and an extra BatchNorm2d on
    its output (MoCo's Res5ROIHeadsExtraNorm), then the average pool: RoIs -> [R, res5 width]."""

    def __init__(self, resnet):
        super().__init__()
        self.layer4 = resnet.layer4
        self.out_channels = stage_widths(resnet)[3]
        self.norm = nn.BatchNorm2d(self.out_channels)

    def feature_maps(self, x):
        return self.norm(self.layer4(x))

    def forward(self, x):
        return self.feature_maps(x).mean(dim=(2, 3))


class C4RoIHeads(RoIHeads):
    """Detectron2's Res5ROIHeads on torchvision's RoIHeads (its sampling, losses and post-processing).

    res5 runs once per sampled RoI; the box predictor sees its average-pooled output and, for Mask
    R-CNN, the mask predictor sees the same 7 x 7 maps of the foreground RoIs (no second pass). At test
    time the masks come from a second res5 pass on the final detections, as in Detectron2.
    """

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        maps = self.box_head.feature_maps(self.box_roi_pool(features, proposals, image_shapes))
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
            maps = self.box_head.feature_maps(self.box_roi_pool(features, boxes, image_shapes))
            for r, probabilities in zip(result, maskrcnn_inference(self.mask_predictor(self.mask_head(maps)), labels)):
                r["masks"] = probabilities
        return result, {}


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's normalise + resize + pad-to-32 batching, with a test size of its own: in training the
    short side is drawn per image from train_sizes, at test time it is test_size; the long side stays <= max_size.
    Images come in as floats in [0, 1] (RGB)."""

    def __init__(self, train_sizes, test_size, max_size, mean, std):
        super().__init__(tuple(train_sizes), max_size, list(mean), list(std))
        self.test_size = test_size

    def resize(self, image, target=None):
        h, w = image.shape[-2:]
        side = self.torch_choice(self.min_size) if self.training else self.test_size
        scale = min(side / min(h, w), self.max_size / max(h, w))
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                              align_corners=False)[0]
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], (h, w), image.shape[-2:])
            if "masks" in target:
                target["masks"] = F.interpolate(target["masks"][:, None].float(), size=image.shape[-2:])[:, 0].byte()
        return image, target


def load_detection_backbone(config, random=False):
    """The pretrained torchvision ResNet (fc = Identity), loaded strictly by intl.load_backbone -> (backbone,
    {"arch", "mean", "std"}: its architecture and input normalisation, --mean / --std where given).
    random: a freshly initialised ResNet of config.arch (for --backbone random, or when a checkpoint provides every
    weight)."""
    if random or config.backbone == "random":
        backbone = intl.build_backbone(config.arch, "imagenet", zero_init_residual=False)
        backbone_config = {"arch": config.arch, "stem": "imagenet", "mean": intl.IMAGENET_MEAN,
                           "std": intl.IMAGENET_STD}
    else:
        backbone, backbone_config = intl.load_backbone(config.backbone, config.arch, config.revision)
    if backbone_config["stem"] != "imagenet":
        raise ValueError(f"{config.backbone} has the {backbone_config['stem']} stem (3x3 stride-1 conv): its res4 "
                         "does not have stride 16, so it does not fit the detectors; use a backbone pretrained with "
                         "the ImageNet stem")
    return backbone.train(), {"arch": backbone_config["arch"], "mean": list(config.mean or backbone_config["mean"]),
                              "std": list(config.std or backbone_config["std"])}


def build_detector(config, backbone, num_classes):
    """A torchvision ResNet -> the --model detector for num_classes classes (+ background), every layer trainable."""
    c4 = config.model.endswith("c4")
    masks = config.model.startswith("mask")
    anchors = (AnchorGenerator((tuple(config.anchor_sizes),), ((0.5, 1.0, 2.0),)) if c4 else
               AnchorGenerator(tuple((s,) for s in config.anchor_sizes), ((0.5, 1.0, 2.0),) * len(config.anchor_sizes)))
    rpn_settings = dict(rpn_pre_nms_top_n_train=config.rpn_pre_nms_train, rpn_post_nms_top_n_train=config.rpn_post_nms_train,
                        rpn_pre_nms_top_n_test=config.rpn_pre_nms_test, rpn_post_nms_top_n_test=config.rpn_post_nms_test,
                        rpn_batch_size_per_image=config.rpn_batch_per_image,
                        box_batch_size_per_image=config.roi_batch_per_image, box_score_thresh=config.score_thresh,
                        box_detections_per_img=config.detections_per_image)
    transform = DetectionTransform(config.train_sizes, config.test_size, config.max_size, config.mean, config.std)
    if c4:
        body, res5 = ResNetC4(backbone), Res5Head(backbone)
        rpn = RegionProposalNetwork(
            anchors, RPNHead(body.out_channels, anchors.num_anchors_per_location()[0]), 0.7, 0.3,
            config.rpn_batch_per_image, 0.5, dict(training=config.rpn_pre_nms_train, testing=config.rpn_pre_nms_test),
            dict(training=config.rpn_post_nms_train, testing=config.rpn_post_nms_test), 0.7)
        pooler = AlignedRoIAlign(["0"], config.pool_size, [1 / 16])
        heads = C4RoIHeads(pooler, res5, box_predictor(res5.out_channels, num_classes), 0.5, 0.5,
                           config.roi_batch_per_image, 0.25, None, config.score_thresh, 0.5,
                           config.detections_per_image)
        if masks:
            heads.mask_roi_pool, heads.mask_head = pooler, nn.Identity()
            heads.mask_predictor = mask_predictor(res5.out_channels, num_classes)
        return GeneralizedRCNN(body, rpn, heads, transform)
    body = BackboneWithFPN(backbone, {f"layer{k}": str(k - 1) for k in range(1, 5)}, stage_widths(backbone), 256)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    box_pool = AlignedRoIAlign(["0", "1", "2", "3"], config.pool_size, scales)
    kind = MaskRCNN if masks else FasterRCNN
    extra = dict(mask_roi_pool=AlignedRoIAlign(["0", "1", "2", "3"], 14, scales)) if masks else {}
    model = kind(body, num_classes + 1, rpn_anchor_generator=anchors, box_roi_pool=box_pool, **rpn_settings, **extra)
    model.roi_heads.box_predictor = box_predictor(1024, num_classes)
    model.transform = transform
    return model


def stage_widths(resnet):
    """Output channels of res2..res5 (layer1..layer4): 256, 512, 1024, 2048 for a ResNet-50, 64..512 for a ResNet-18."""
    return [layer[-1].conv3.out_channels if hasattr(layer[-1], "conv3") else layer[-1].conv2.out_channels
            for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)]


def box_predictor(in_channels, num_classes):
    """Class scores and class-specific box deltas from N(0, 0.01) and N(0, 0.001), zero biases (Detectron2)."""
    predictor = FastRCNNPredictor(in_channels, num_classes + 1)
    for layer, std in ((predictor.cls_score, 0.01), (predictor.bbox_pred, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    return predictor


def mask_predictor(in_channels, num_classes):
    """Detectron2's C4 mask head (no convolutions): a 2 x 2 stride-2 deconvolution to 256 channels (MSRA init),
    ReLU, then per-class mask logits from N(0, 0.001)."""
    predictor = MaskRCNNPredictor(in_channels, 256, num_classes + 1)
    nn.init.kaiming_normal_(predictor.conv5_mask.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(predictor.conv5_mask.bias)
    nn.init.normal_(predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(predictor.mask_fcn_logits.bias)
    return predictor


NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
              nn.InstanceNorm2d, torchvision.ops.FrozenBatchNorm2d)


def parameter_groups(model, weight_decay):
    """Weight decay on every parameter but those of normalisation layers (Detectron2: WEIGHT_DECAY_NORM = 0)."""
    norm = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in norm], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in norm], "weight_decay": 0.0}]


def build_optimizer(model, config):
    return torch.optim.SGD(parameter_groups(model, config.weight_decay), lr=0.0, momentum=config.momentum)


# -----------------------------------------------------------------------------
# Data: VOC (torchvision's VOCDetection layout) and COCO-format (CocoDetection), as records
#
# A record is one image: its file, size, boxes [N, 4] (x1, y1, x2, y2, 0-based continuous coordinates),
# labels [N] (1..K, 0 is the background), difficult [N] (VOC) and, for COCO, its image id and the
# segmentations of its instances. VOC boxes are 1-based inclusive pixel indices in the XML: x1 and y1
# lose 1, as Detectron2 does; evaluation turns them back into the devkit's coordinates.


def load_train_data(config):
    if config.dataset == "voc":
        records = [r for spec in config.train_sets.split(",") for r in voc_records(config.data_root, spec.strip(),
                                                                                   voc_classes(config))]
    else:
        records = coco_data(config.train_json or os.path.join(config.data_root, "annotations", "instances_train2017.json"),
                            config.train_images or os.path.join(config.data_root, "train2017"),
                            masks=config.model.startswith("mask"))["records"]
        # Detectron2 trains only on images with at least one non-crowd instance.
        records = [r for r in records if len(r["boxes"])]
    if not records:
        raise ValueError("the training set has no image with an object")
    return {"records": records}


def load_test_data(config):
    if config.dataset == "voc":
        classes = voc_classes(config)
        return {"name": config.test_set, "classes": classes,
                "records": voc_records(config.data_root, config.test_set, classes)}
    json_file = config.test_json or os.path.join(config.data_root, "annotations", "instances_val2017.json")
    data = coco_data(json_file, config.test_images or os.path.join(config.data_root, "val2017"), masks=False)
    return {"name": json_file, **data}


def voc_classes(config):
    classes = tuple(c.strip() for c in config.voc_classes.split(",") if c.strip())
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"--voc_classes {config.voc_classes!r}: give distinct class names joined by commas")
    return classes


def voc_records(root, spec, classes):
    """'2007-trainval' under ROOT/VOCdevkit/VOC2007 -> records, through torchvision's VOCDetection."""
    year, _, image_set = spec.partition("-")
    where = f"{root}/VOCdevkit/VOC{year}"
    layout = (f"expected {where}/JPEGImages/*.jpg, {where}/Annotations/*.xml and {where}/ImageSets/Main/{image_set}.txt "
              "(the layout the VOCtrainval / VOCtest tarballs unpack to; --data_root is the folder holding VOCdevkit/)")
    try:
        dataset = torchvision.datasets.VOCDetection(root, year=year, image_set=image_set)
    except (RuntimeError, FileNotFoundError):
        raise ValueError(f"no VOC {spec} under {root}: {layout}") from None
    except ValueError as error:
        raise ValueError(f"VOC set {spec!r}: {error}; give YEAR-IMAGESET such as 2007-trainval") from None
    index = {name: i + 1 for i, name in enumerate(classes)}
    records = []
    for image_file, xml_file in zip(dataset.images, dataset.annotations):
        try:
            annotation = dataset.parse_voc_xml(ET.parse(xml_file).getroot())["annotation"]
        except (OSError, ET.ParseError) as error:
            raise ValueError(f"cannot read VOC annotation {xml_file}: {error}; {layout}") from None
        boxes, labels, difficult = [], [], []
        for obj in annotation.get("object", []):
            if obj["name"] not in index:
                raise ValueError(f"{xml_file}: class {obj['name']!r} is not among --voc_classes")
            b = obj["bndbox"]
            boxes.append([float(b["xmin"]) - 1, float(b["ymin"]) - 1, float(b["xmax"]), float(b["ymax"])])
            labels.append(index[obj["name"]])
            difficult.append(int(obj.get("difficult", 0)) == 1)
        size = annotation["size"]
        records.append({"file": image_file, "image_id": Path(image_file).stem, "width": int(size["width"]),
                        "height": int(size["height"]), "boxes": np.array(boxes, np.float32).reshape(-1, 4),
                        "labels": np.array(labels, np.int64), "difficult": np.array(difficult, bool)})
    return records


def coco_data(json_file, image_dir, masks):
    """A COCO-format json + image folder -> records (crowd instances left out) and the ground truth for COCOeval.

    Category ids become contiguous labels 1..K in the order of the ids; `category_ids` maps them back.
    Boxes are clipped to the image; boxes without area are dropped (Detectron2's filter_empty_instances).
    """
    if not os.path.isfile(json_file) or not os.path.isdir(image_dir):
        raise ValueError(f"no COCO-format data at {json_file} + {image_dir}: expected a COCO json (images, "
                         "annotations, categories) and the folder its file_names are relative to, e.g. "
                         "DATA_ROOT/annotations/instances_train2017.json + DATA_ROOT/train2017/ (and val2017)")
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            dataset = torchvision.datasets.CocoDetection(image_dir, json_file)
        except (ValueError, KeyError, TypeError, AssertionError) as error:
            raise ValueError(f"{json_file} is not a COCO-format json: {error}") from None
    coco = dataset.coco
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.dataset.get(key), list):
            raise ValueError(f"{json_file} has no {key!r} list: not a COCO-format json (it needs images, annotations "
                             "and categories)")
    category_ids = sorted(coco.getCatIds())
    label_of = {cat: i + 1 for i, cat in enumerate(category_ids)}
    records = []
    for image_id in dataset.ids:
        info = coco.imgs[image_id]
        w, h = info["width"], info["height"]
        boxes, labels, segmentations = [], [], []
        for ann in coco.imgToAnns.get(image_id, []):
            if ann.get("iscrowd", 0):
                continue
            bbox = ann.get("bbox")
            if not (isinstance(bbox, list) and len(bbox) == 4 and all(
                    isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
                raise ValueError(f"{json_file}: annotation {ann.get('id')} (image {image_id}) has bbox {bbox}: give 4 "
                                 "finite numbers [x, y, width, height]; fix or remove the annotation")
            if ann.get("category_id") not in label_of:
                raise ValueError(f"{json_file}: annotation {ann.get('id')} (image {image_id}) has category_id "
                                 f"{ann.get('category_id')!r}, which is not among the categories {category_ids}")
            x, y, bw, bh = bbox
            box = [min(max(x, 0), w), min(max(y, 0), h), min(max(x + bw, 0), w), min(max(y + bh, 0), h)]
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            if masks and not ann.get("segmentation"):
                raise ValueError(f"{json_file}: annotation {ann.get('id')} has no segmentation, which the mask "
                                 "models need; use faster-c4 or faster-fpn")
            boxes.append(box)
            labels.append(label_of[ann["category_id"]])
            segmentations.append(ann.get("segmentation"))
        records.append({"file": os.path.join(image_dir, info["file_name"]), "image_id": image_id, "width": w,
                        "height": h, "boxes": np.array(boxes, np.float32).reshape(-1, 4),
                        "labels": np.array(labels, np.int64), "difficult": np.zeros(len(boxes), bool),
                        "segmentations": segmentations if masks else None})
    names = [coco.cats[c]["name"] for c in category_ids]
    return {"records": records, "classes": names, "category_ids": category_ids, "coco": coco}


def rasterize(segmentations, height, width):
    """COCO polygons / RLEs -> uint8 masks [N, H, W]."""
    from pycocotools import mask as mask_utils

    out = np.zeros((len(segmentations), height, width), np.uint8)
    for i, segmentation in enumerate(segmentations):
        if isinstance(segmentation, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        with warnings.catch_warnings():  # pycocotools' own use of numpy's __array__ protocol
            warnings.simplefilter("ignore", DeprecationWarning)
            out[i] = mask_utils.decode(rle)
    return torch.from_numpy(out)


class DetectionImages(torch.utils.data.Dataset):
    """Records -> (uint8 image [3, H, W], target {boxes, labels[, masks]}, record index).

    Training items are keyed (epoch, index): the horizontal flip (p 0.5) is drawn from a generator
    seeded by (seed, epoch, index), so a resumed run replays it. Test items are keyed by index, unflipped.
    The short-side resize happens in the model (DetectionTransform).
    """

    def __init__(self, records, train, seed=0, masks=False):
        self.records, self.train, self.seed, self.masks = records, train, seed, masks

    def __len__(self):
        return len(self.records)

    def __getitem__(self, key):
        epoch, index = key if self.train else (None, key)
        record = self.records[index]
        try:
            with PILImage.open(record["file"]) as handle:
                image = torch.from_numpy(np.asarray(intl.to_rgb(handle), dtype=np.uint8).copy()).permute(2, 0, 1)
        except Exception as error:  # PIL raises many types on corrupt data
            raise intl.UnreadableImageError(f"Cannot read image {record['file']}: {error}") from error
        target = {"boxes": torch.from_numpy(record["boxes"].copy()), "labels": torch.from_numpy(record["labels"].copy())}
        if self.masks:
            target["masks"] = rasterize(record["segmentations"], image.shape[1], image.shape[2])
        if self.train:
            generator = torch.Generator().manual_seed(hash((self.seed, epoch, index)) % 2**63)
            if torch.rand(1, generator=generator) < 0.5:
                width = image.shape[-1]
                image = image.flip(-1)
                target["boxes"] = torch.stack([width - target["boxes"][:, 2], target["boxes"][:, 1],
                                               width - target["boxes"][:, 0], target["boxes"][:, 3]], dim=1)
                if self.masks:
                    target["masks"] = target["masks"].flip(-1)
        return image, target, index


def collate(batch):
    return tuple(zip(*batch))


class GroupedBatchSampler(torch.utils.data.Sampler):
    """An endless stream of training batches of keys (epoch, index), starting at a given iteration.

    Each epoch is one permutation from (seed, epoch); landscape and portrait images are batched
    separately (Detectron2's aspect-ratio grouping, so a batch pads little), and the global batches are
    taken in the order their first image appears in the permutation. Process r takes the r-th slice of
    every global batch. Every epoch has the same number of batches, so iteration i is always the same batch.
    """

    def __init__(self, records, batch_size, num_processes, rank, seed, start=0):
        self.landscape = np.array([r["width"] >= r["height"] for r in records])
        self.batch_size, self.num_processes, self.rank, self.seed, self.start = batch_size, num_processes, rank, seed, start
        global_batch = batch_size * num_processes
        self.batches_per_epoch = int(self.landscape.sum()) // global_batch + int((~self.landscape).sum()) // global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(records)} training images do not fill one global batch of {global_batch} images "
                             "of one orientation: lower --batch_size")

    def epoch_batches(self, epoch):
        order = intl.epoch_order(len(self.landscape), self.seed, epoch).numpy()
        global_batch = self.batch_size * self.num_processes
        batches = []
        for orientation in (True, False):
            members = order[self.landscape[order] == orientation]
            batches += [members[s:s + global_batch] for s in range(0, len(members) - global_batch + 1, global_batch)]
        position = np.empty(len(order), np.int64)
        position[order] = np.arange(len(order))
        return sorted(batches, key=lambda b: position[b[0]])

    def __iter__(self):
        iteration = self.start
        while True:
            epoch, b = divmod(iteration, self.batches_per_epoch)
            batches = self.epoch_batches(epoch)
            for batch in batches[b:]:
                mine = batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
                yield [(epoch, int(i)) for i in mine]
                iteration += 1


def training_loader(train, config, accelerator, start):
    sampler = GroupedBatchSampler(train["records"], config.batch_size, accelerator.num_processes,
                                  accelerator.process_index, config.seed, start)
    dataset = DetectionImages(train["records"], train=True, seed=config.seed, masks=config.model.startswith("mask"))
    # Its own generator: creating the loader must not draw from the global RNG, which the resumed run restores.
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers,
                                       collate_fn=collate, pin_memory=accelerator.device.type == "cuda",
                                       generator=torch.Generator().manual_seed(config.seed))


def to_device(images, targets, device):
    images = [image.to(device, non_blocking=True).float().div_(255) for image in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def training_batches(train, config, accelerator, start, count):
    """`count` training batches from iteration `start` on (on the device)."""
    loader = training_loader(train, config, accelerator, start)
    for n, (images, targets, _) in enumerate(loader):
        if n == count:
            return
        yield to_device(images, targets, accelerator.device)


# -----------------------------------------------------------------------------
# Training


def train_loop(model, optimizer, train, plan, iteration, stop_at, config, accelerator, output_dir):
    global_batch = config.batch_size * accelerator.num_processes
    progress = tqdm(total=stop_at, initial=iteration, disable=not accelerator.is_main_process, desc="detection")
    model.train()
    tic, images_seen = time.time(), 0
    last_good = intl.latest_checkpoint(output_dir)
    try:
        for images, targets in training_batches(train, config, accelerator, iteration, stop_at - iteration):
            lr = learning_rate(iteration, plan)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = model(images, targets)
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"the loss is {loss.item()} at iteration {iteration} "
                                         f"({ {k: round(v.item(), 4) for k, v in losses.items()} }); the last good "
                                         f"checkpoint is {last_good or 'none'}. Lower --lr or lengthen the warm-up")
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            iteration += 1
            images_seen += global_batch
            progress.update(1)
            if iteration % config.log_every == 0 or iteration == stop_at:
                values = accelerator.reduce(torch.stack([loss.detach(), *[v.detach() for v in losses.values()]]),
                                            "mean").tolist()
                speed = images_seen / (time.time() - tic)
                record = {"iteration": iteration, "loss": values[0], **dict(zip(losses, values[1:])), "lr": lr,
                          "images_per_s": speed}
                progress.set_postfix(loss=f"{values[0]:.3f}", img_s=f"{speed:.2f}")
                if accelerator.is_main_process:
                    with open(output_dir / "log.jsonl", "a") as log:
                        log.write(json.dumps(record) + "\n")
            if iteration % config.save_every == 0 or iteration == stop_at:
                last_good = save_checkpoint(accelerator, config, {"iteration": iteration, "precise_bn_done": False},
                                            output_dir)
    except KeyboardInterrupt:
        raise intl.Interrupted(f"interrupted at iteration {iteration}; continue with --resume latest (from the last "
                               f"checkpoint, {last_good.name})" if last_good else
                               f"interrupted at iteration {iteration}, before the first checkpoint: nothing to "
                               "resume; start the run again") from None
    finally:
        progress.close()  # before any error message, so that the message is the last line
    return iteration


@torch.no_grad()
def precise_bn(model, batches, accelerator=None):
    """Every BatchNorm's running mean and variance <- the mean of its per-batch statistics over `batches`
    (the model in training mode, without gradients), as the protocol does before the final evaluation.

    With momentum None, PyTorch's BatchNorm keeps the cumulative average of the batch statistics, so
    resetting the statistics first leaves exactly their mean. Several processes average theirs.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    count = 0
    for images, targets in batches:
        model(images, targets)
        count += 1
    if count == 0:
        raise ValueError("precise BN got no training batch")
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        if accelerator is not None and accelerator.num_processes > 1:
            m.running_mean.copy_(accelerator.reduce(m.running_mean.clone(), "mean"))
            m.running_var.copy_(accelerator.reduce(m.running_var.clone(), "mean"))
    model.train(was_training)
    return count


# -----------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(model, records, config, accelerator):
    """Detections of every test image (each process takes every n-th image), gathered on every process:
    [{"index", "boxes" [D, 4] in original pixels, "scores", "labels", ("masks": RLEs)}]."""
    masks = config.model.startswith("mask")
    model.eval()
    shard = list(range(accelerator.process_index, len(records), accelerator.num_processes))
    loader = torch.utils.data.DataLoader(DetectionImages(records, train=False), batch_size=config.eval_batch_size,
                                         sampler=shard, num_workers=config.num_workers, collate_fn=collate)
    predictions = []
    for images, _, indices in tqdm(loader, desc="evaluation", disable=not accelerator.is_main_process, leave=False):
        outputs = model([image.to(accelerator.device).float().div_(255) for image in images])
        for index, out in zip(indices, outputs):
            prediction = {"index": index, "boxes": out["boxes"].float().cpu().numpy(),
                          "scores": out["scores"].float().cpu().numpy(), "labels": out["labels"].cpu().numpy()}
            if masks:
                prediction["masks"] = encode_masks(out["masks"][:, 0] > 0.5)
            predictions.append(prediction)
    model.train()
    if accelerator.num_processes > 1:
        predictions = gather_object(predictions)
    predictions = sorted(predictions, key=lambda p: p["index"])
    if [p["index"] for p in predictions] != list(range(len(records))):
        raise RuntimeError(f"{len(predictions)} predictions gathered for {len(records)} test images")
    return predictions


def encode_masks(masks):
    """bool [N, H, W] -> COCO compressed RLEs (counts as str, JSON-able)."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.encode(np.asfortranarray(masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def evaluate_predictions(predictions, test, config):
    if config.dataset == "voc":
        return {"bbox": voc_evaluate(predictions, test["records"], test["classes"], config.voc_metric == "11point")}
    iou_types = ["bbox", "segm"] if config.model.startswith("mask") else ["bbox"]
    return coco_evaluate(predictions, test["records"], test["coco"], test["category_ids"], iou_types)


def voc_ap(recall, precision, use_11_point=True):
    """AP from a precision-recall curve: VOC07's mean of the best precision at recall >= 0, 0.1, ..., 1, or the
    area under the curve made monotone (VOC2010+)."""
    if use_11_point:
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    change = np.where(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[change + 1] - recall[change]) * precision[change + 1]))


def voc_class_ap(detections, ground_truth, iou_threshold, use_11_point=True):
    """One class's AP by the VOC devkit's rules.

    detections: [(image key, score, box)]; ground_truth: {image key: (boxes [G, 4], difficult [G])}; boxes in
    the devkit's inclusive pixel coordinates (areas and overlaps count +1 pixel). Detections are taken by
    decreasing score; each is a true positive if its best-overlapping ground truth has IoU > threshold
    (strictly) and was not matched before, ignored if that ground truth is difficult, a false positive
    otherwise. Difficult objects do not count towards recall. Returns nan when the class has no object.
    """
    ground_truth = {key: (np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(difficult, bool))
                    for key, (boxes, difficult) in ground_truth.items()}
    positives = sum(int((~difficult).sum()) for _, difficult in ground_truth.values())
    if positives == 0:
        return float("nan")
    order = sorted(range(len(detections)), key=lambda d: -detections[d][1])
    matched = {key: np.zeros(len(boxes), bool) for key, (boxes, _) in ground_truth.items()}
    tp, fp = np.zeros(len(detections)), np.zeros(len(detections))
    for rank, d in enumerate(order):
        key, _, box = detections[d]
        box = np.asarray(box, np.float64)
        boxes, difficult = ground_truth.get(key, (np.zeros((0, 4)), np.zeros(0, bool)))
        if len(boxes) == 0:
            fp[rank] = 1
            continue
        iw = (np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + 1).clip(min=0)
        ih = (np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + 1).clip(min=0)
        inter = iw * ih
        union = ((box[2] - box[0] + 1) * (box[3] - box[1] + 1)
                 + (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1) - inter)
        overlaps = inter / union
        best = int(np.argmax(overlaps))
        if overlaps[best] > iou_threshold:
            if difficult[best]:
                continue
            if not matched[key][best]:
                tp[rank], matched[key][best] = 1, True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / positives
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_11_point)


def voc_evaluate(predictions, records, classes, use_11_point=True):
    """Detectron2's PascalVOCDetectionEvaluator numbers (x100): AP = the mean over IoU 0.50:0.05:0.95 of the mean
    over classes of the class AP; AP50; AP75; and AP50 per class. Boxes go back to the devkit's coordinates
    (x1 and y1 + 1) for predictions and ground truth alike; the predictions' scores and corners are rounded as
    the evaluator's detection files hold them (`as_written_to_detection_files`). Classes without a test object
    are left out. `predictions` come in image order, as the evaluator writes them."""
    per_class = {}
    for c, name in enumerate(classes, start=1):
        ground_truth = {}
        for i, r in enumerate(records):
            chosen = r["labels"] == c
            ground_truth[i] = (devkit_boxes(r["boxes"][chosen]), r["difficult"][chosen])
        detections = [(p["index"], score, box) for p in predictions
                      for score, box in as_written_to_detection_files(p["scores"][p["labels"] == c],
                                                                      p["boxes"][p["labels"] == c])]
        per_class[name] = [voc_class_ap(detections, ground_truth, t, use_11_point) for t in IOU_THRESHOLDS]
    evaluated = {name: aps for name, aps in per_class.items() if not math.isnan(aps[0])}
    if not evaluated:
        raise ValueError("the test set has no object of any class: nothing to evaluate")
    table = np.array(list(evaluated.values())) * 100  # [classes, thresholds]
    result = {"AP": float(table.mean()), "AP50": float(table[:, 0].mean()), "AP75": float(table[:, 5].mean()),
              "per_class_AP50": {name: float(ap[0] * 100) for name, ap in evaluated.items()},
              "metric": "VOC07 11-point" if use_11_point else "area"}
    if len(evaluated) < len(classes):
        result["classes_without_test_objects"] = [name for name in classes if name not in evaluated]
    return result


def devkit_boxes(boxes):
    """0-based [x1, y1, x2, y2] -> the devkit's 1-based inclusive pixel coordinates (x1 and y1 + 1)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4).copy()
    boxes[:, :2] += 1
    return boxes


def as_written_to_detection_files(scores, boxes):
    """One class's detections of one image as the published VOC numbers saw them: [(score, devkit box)].

    Detectron2's PascalVOCDetectionEvaluator does not hand its predictions to the devkit's voc_eval directly: it
    writes one text file per class, a line "image score x1 y1 x2 y2" per detection, formatted "{:.3f}" for the
    score and "{:.1f}" for the corners (in the devkit's coordinates: x1 and y1 + 1, added to the model's float32
    corners), and voc_eval reads the files back. So the AP counts scores to 3 decimals, which turns nearby scores
    into ties, and corners to 0.1 px, which moves IoUs near a threshold across it: on small test sets AP50
    changes by up to about a point. The values are formatted and parsed exactly as there.

    Decision: detections of equal (rounded) score are then taken in the order the evaluator writes them, image by
    image (Python's stable sort in `voc_class_ap`). voc_eval itself sorts with np.argsort(-confidence), numpy's
    unstable default sort, whose order among equal scores depends on the numpy version and on the CPU's SIMD
    instructions: no fixed order reproduces it everywhere.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    boxes[:, :2] += 1  # in float32, as Detectron2 adds 1 to the float32 corners before writing them
    return [(float(f"{float(score):.3f}"), np.array([float(f"{float(v):.1f}") for v in box]))
            for score, box in zip(scores, boxes)]


def coco_evaluate(predictions, records, coco, category_ids, iou_types=("bbox",)):
    """pycocotools' COCOeval on the predictions (labels mapped back to the json's category ids); AP, AP50, AP75,
    APs, APm, APl (x100) per IoU type; None where the test set has no object of that size. No detection at all
    gives 0 (COCOeval cannot load an empty result)."""
    from pycocotools.cocoeval import COCOeval

    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    results = {}
    for iou_type in iou_types:
        detections = []
        for p in predictions:
            image_id = records[p["index"]]["image_id"]
            for d, (box, score, label) in enumerate(zip(p["boxes"], p["scores"], p["labels"])):
                entry = {"image_id": image_id, "category_id": category_ids[int(label) - 1], "score": float(score)}
                if iou_type == "bbox":
                    entry["bbox"] = [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]
                else:
                    entry["segmentation"] = dict(p["masks"][d])
                detections.append(entry)
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


def results_table(results):
    rows = [f"{'':6s} {'AP':>7s} {'AP50':>7s} {'AP75':>7s}"]
    for iou_type in ("bbox", "segm"):
        if iou_type in results:
            r = results[iou_type]
            rows.append(f"{iou_type:6s} {r['AP']:7.2f} {r['AP50']:7.2f} {r['AP75']:7.2f}")
    return (f"{results['model']} on {results['test_set']} ({results['test_images']} images, "
            f"{results['iterations']} iterations)\n" + "\n".join(rows))


# -----------------------------------------------------------------------------
# Checkpoints (atomic, explicit names) and the log


def save_checkpoint(accelerator, config, state, output_dir):
    return intl.save_state_atomically(accelerator, output_dir / "checkpoints" / f"step-{state['iteration']:08d}",
                                      "trainer_state.json", {**state, "config": vars(config)}, config.keep)


# -----------------------------------------------------------------------------
# Benchmark


def benchmark(config, accelerator):
    """Seconds per training iteration of --model on random images of --benchmark_size, and the peak memory."""
    config.mean, config.std = list(intl.IMAGENET_MEAN), list(intl.IMAGENET_STD)
    set_seed(config.seed)
    model = build_detector(config, intl.build_backbone(config.arch, "imagenet", zero_init_residual=False),
                           len(VOC_CLASSES)).to(accelerator.device)
    optimizer = build_optimizer(model, config)
    h, w = config.benchmark_size
    images = [torch.rand(3, h, w, device=accelerator.device) for _ in range(config.batch_size)]
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.9], [0.2, 0.5, 0.4, 0.95]]) * torch.tensor([w, h, w, h])
    targets = [{"boxes": boxes.to(accelerator.device), "labels": torch.tensor([1, 2, 3], device=accelerator.device)}
               for _ in images]
    if config.model.startswith("mask"):
        for t in targets:
            t["masks"] = torch.zeros(3, h, w, dtype=torch.uint8, device=accelerator.device)
            for m, (x1, y1, x2, y2) in zip(t["masks"], boxes.round().int().tolist()):
                m[y1:y2, x1:x2] = 1
    model.train()
    timings = []
    for _ in range(config.benchmark + 1):  # the first is a warm-up
        tic = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - tic)
    memory = (torch.cuda.max_memory_allocated() if accelerator.device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"model": config.model, "arch": config.arch, "device": str(accelerator.device),
                      "threads": torch.get_num_threads(), "images_per_iteration": config.batch_size,
                      "input_size": [h, w], "train_short_side": config.train_sizes,
                      "seconds_per_iteration": round(float(np.mean(timings[1:])), 3),
                      "images_per_s": round(config.batch_size / float(np.mean(timings[1:])), 3),
                      "peak_memory_gb": round(memory / 2**30, 2)}, indent=2))


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FloatingPointError) as error:
        sys.exit(f"error: {error}")
    except intl.UnreadableImageError as error:
        sys.exit(f"error: {error.one_line()}")
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line, exit status 130
        intl.exit_interrupted(interrupt, "interrupted; if OUTPUT_DIR holds a checkpoint, continue with --resume latest")
