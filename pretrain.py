"""Pretrain a ResNet with INTL (INTL-M, or a relative from the whitening family) on one CPU up to many GPUs.

    python pretrain.py --output_dir runs/digits                  # offline demo: minutes on a CPU
    accelerate launch pretrain.py --preset intl-m-800ep --dataset /data/imagenet --output_dir runs/in1k

--output_dir receives checkpoints/ (resumable), log.jsonl, spectrum.png (the covariance spectra of Z and Z_hat, the
paper's Fig. 3) and backbone/ (the encoder alone: model.safetensors + config.json, loadable into torchvision).
Reading order: the presets and the flags, `main`, `train` and its parts; then the paper's studies and --benchmark.
linear_eval.py evaluates the backbone and publishes it with its results.
"""

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import ImageFilter
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

import intl

IMAGENET_MEAN, IMAGENET_STD, CIFAR_MEAN, CIFAR_STD = intl.IMAGENET_MEAN, intl.IMAGENET_STD, intl.CIFAR_MEAN, intl.CIFAR_STD

METHODS = ["intl", "intl-m", "st", "cw-rgp", "wmse"]

# The authors' runs, value by value (README: "Presets"; PAPER_NOTES.md section 11). A preset sets these values and
# any explicit flag wins; every value a recipe depends on is named, also where it equals the flag's default. Not in
# the values: the lr schedules (learning_rate), intl-m's momentum rising to 1, CW-RGP's projector seeing all views.
_INTL = dict(method="intl", stem="imagenet", zero_init_residual=True, hidden_bias=False, num_views=2, small_crops=[],
             min_scale=0.08, crop_interpolation="bicubic", colour_before_crop=False, jitter=(0.4, 0.4, 0.2, 0.1),
             grayscale_prob=0.2, blur_prob=(1.0, 0.1), solarize_prob=(0.0, 0.2), optimizer="sgd", schedule="cosine",
             warmup_epochs=2, warmup_steps=None, decay_all_params=False, iters=4, axis=0)
_CIFAR = dict(_INTL, arch="resnet18", stem="cifar", zero_init_residual=False, image_size=32,
              projector="2048-2048-2048", batch_size=256, epochs=1000, lr=0.3, weight_decay=1e-4,
              decay_all_params=True, momentum=0.999, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.2),
              mean=CIFAR_MEAN, std=CIFAR_STD, mixed_precision="no")
_IMAGENET = dict(_INTL, dataset="ILSVRC/imagenet-1k", arch="resnet50", image_size=224, projector="8192-8192-8192",
                 batch_size=256, weight_decay=1e-5, mean=IMAGENET_MEAN, std=IMAGENET_STD, mixed_precision="fp16")
_INTL_M = dict(_IMAGENET, method="intl-m", momentum=0.996, min_scale=0.2, small_crops=[192, 160, 128, 96],
               blur_prob=(0.5, 0.5), solarize_prob=(0.1, 0.1))
# CW-RGP (its authors' scripts, W-MSE's setup on small data): colour first, then the crop; 500 warm-up steps.
_CW_RGP = dict(_INTL, method="cw-rgp", arch="resnet18", stem="cifar-unpadded", zero_init_residual=True,
               image_size=32, projector="1024-512", hidden_bias=True, num_views=4, groups=4, w_size=64,
               batch_size=256, epochs=1000, optimizer="adam", lr=3e-3, weight_decay=1e-6, decay_all_params=True,
               schedule="step", warmup_epochs=0, warmup_steps=500, colour_before_crop=True, jitter=(0.4, 0.4, 0.4, 0.1),
               grayscale_prob=0.1, min_scale=0.2, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0), mixed_precision="no")
_CW_RGP_IMAGENET = dict(_CW_RGP, dataset="ILSVRC/imagenet-1k", arch="resnet50", stem="imagenet", image_size=224,
                        projector="2048-2048-1024", groups=2, w_size=128, batch_size=512, optimizer="sgd", lr=0.05,
                        weight_decay=1e-4, schedule="cosine-epoch", colour_before_crop=False,
                        crop_interpolation="bilinear", grayscale_prob=0.2, blur_prob=(0.5, 0.5),
                        mean=IMAGENET_MEAN, std=IMAGENET_STD)
PRESETS = {
    # Offline demo on scikit-learn's digits: the CIFAR recipe at a budget that shows learning in minutes on 2 cores,
    # its blocks zero-initialised so that the 5-NN's rise shows what INTL learned (README: Decisions).
    "digits": dict(_CIFAR, dataset="digits", stem="imagenet", zero_init_residual=True, projector="512-512-512",
                   batch_size=128, epochs=20, momentum=0.99, mean=IMAGENET_MEAN, std=IMAGENET_STD, knn_every=5,
                   spectrum_every=20, num_workers=2),
    "cifar10": dict(_CIFAR, dataset="uoft-cs/cifar10"),
    # Pretrained with CIFAR-100's statistics, evaluated with CIFAR-10's (as the authors).
    "cifar100": dict(_CIFAR, dataset="uoft-cs/cifar100", mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
                     eval_mean=CIFAR_MEAN, eval_std=CIFAR_STD),
    # ImageNet-100 is a 100-class subset of ImageNet without a canonical Hub copy: --dataset names its folder.
    "imagenet100": dict(_IMAGENET, dataset=None, arch="resnet18", zero_init_residual=False,
                        projector="4096-4096-8192", batch_size=128, epochs=400, lr=0.5, weight_decay=2.5e-5),
    "imagenet-800ep": dict(_IMAGENET, epochs=800, lr=0.3),
    "intl-m-100ep": dict(_INTL_M, epochs=100, lr=0.5),
    "intl-m-200ep": dict(_INTL_M, epochs=200, lr=0.4),
    "intl-m-400ep": dict(_INTL_M, epochs=400, lr=0.4),
    "intl-m-800ep": dict(_INTL_M, epochs=800, lr=0.3),
    # CW-RGP's small-data recipes (4 views). STL-10 and Tiny-ImageNet have no canonical Hub copy: --dataset.
    "cw-rgp-cifar10": dict(_CW_RGP, dataset="uoft-cs/cifar10", mean=(0.4914, 0.4822, 0.4465),
                           std=(0.2023, 0.1994, 0.2010), eval_std=(0.247, 0.243, 0.261)),
    "cw-rgp-cifar100": dict(_CW_RGP, dataset="uoft-cs/cifar100", mean=(0.5071, 0.4867, 0.4408),
                            std=(0.2675, 0.2565, 0.2761)),
    "cw-rgp-stl10": dict(_CW_RGP, dataset=None, stem="small-maxpool", image_size=64, lr=2e-3, epochs=2000,
                         mean=(0.43, 0.42, 0.39), std=(0.27, 0.26, 0.27), eval_resize=70,
                         eval_interpolation="bicubic"),
    "cw-rgp-tiny-imagenet": dict(_CW_RGP, dataset=None, stem="small-maxpool", image_size=64, lr=2e-3,
                                 projector="2048-1024", groups=2, w_size=128, mean=(0.480, 0.448, 0.398),
                                 std=(0.277, 0.269, 0.282)),
    # CW-RGP on ImageNet (4 views, batch 512). Their optional covariance term: --cov_weight 0.005 --cov_epochs 50
    # (100 epochs), --cov_weight 0.01 --cov_epochs 100 (200 epochs).
    "cw-rgp-imagenet-100ep": dict(_CW_RGP_IMAGENET, epochs=100),
    "cw-rgp-imagenet-200ep": dict(_CW_RGP_IMAGENET, epochs=200),
}
# Flags that only steer the run, not what it computes: a resumed run may change them, and keeps their saved values
# when they are not given again.
RUN_CONTROL = {"output_dir", "resume", "print_config", "num_workers", "compile", "log_every", "spectrum_every",
               "knn_every", "save_every", "keep", "stop_after_steps", "benchmark", "study", "study_values", "overwrite"}
# Of those, the ones that say what this one command does: never taken from the checkpoint.
PER_COMMAND = {"output_dir", "resume", "print_config", "stop_after_steps", "benchmark", "study",
               "study_values", "overwrite"}
# What `accelerate launch` (or `accelerate config`) sets: it wins over a preset, an explicit flag wins over both.
LAUNCHER = {"mixed_precision": "ACCELERATE_MIXED_PRECISION"}
# What a run writes into --output_dir, which a new run must not mix with nor replace (log.jsonl restarts: Decisions).
RESULTS = ("checkpoints", "backbone", "spectrum.png")
# The valid range of every numeric flag (intl.check_settings), checked before any work and in saved configs.
RANGES = {"seed": "[0, 4294967295]", "image_size": "[1, inf)", "mean": "(-inf, inf)", "std": "(0, inf)",
          "num_workers": "[0, inf)", "iters": "[1, inf)", "beta": "[0, inf)", "momentum": "[0, 1]", "power": "[0, inf)",
          "groups": "[1, inf)", "w_size": "[2, inf)", "w_iter": "[1, inf)", "w_eps": "[0, 1]", "num_views": "[1, inf)",
          "epochs": "[1, inf)", "lr": "(0, inf)", "weight_decay": "[0, inf)", "warmup_epochs": "[0, inf)",
          "save_every": "[1, inf)", "keep": "[1, inf)", "stop_after_steps": "[1, inf)", "log_every": "[1, inf)",
          "spectrum_every": "[1, inf)", "knn_every": "[0, inf)", "benchmark": "[0, inf)", "min_scale": "(0, 1]",
          "grayscale_prob": "[0, 1]", "eval_mean": "(-inf, inf)", "eval_std": "(0, inf)", "eval_resize": "[1, inf)",
          "cov_weight": "[0, inf)", "cov_epochs": "[0, inf)", "warmup_steps": "[0, inf)", "jitter": "[0, inf)",
          "blur_prob": "[0, 1]", "solarize_prob": "[0, 1]", "small_crops": "[1, inf)", "study_values": "[0, inf)",
          "batch_size": "[2, inf)"}  # whitening needs 2 samples


def get_parser():
    parser = argparse.ArgumentParser(description="INTL self-supervised pretraining", allow_abbrev=False,
                                     usage="%(prog)s [--preset NAME] [--dataset DATASET] [--output_dir DIR] [flags]",
                                     formatter_class=intl.HelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, metavar="NAME",
                        help=f"an authors' recipe: {', '.join(sorted(PRESETS))}; without it and --dataset: digits")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the data order and the augmentations")

    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default=None,
                      help="a Hub dataset id, a folder of class sub-folders, a save_to_disk folder, or 'digits'")
    data.add_argument("--split", default="train", help="split to pretrain on")
    data.add_argument("--eval_split", default="test", help="held-out split of the 5-NN monitor")
    data.add_argument("--image_column", default=None, help="image column; None: detected")
    data.add_argument("--label_column", default=None, help="label column; None: detected")
    data.add_argument("--num_workers", type=int, default=8, help="data loader processes per training process")
    data.add_argument("--image_size", type=int, default=224, help="side of the large crops, in pixels")
    data.add_argument("--num_views", type=int, default=2, help="large crops per image (CW-RGP: 4)")
    data.add_argument("--small_crops", type=int, nargs="*", default=[],
                      help="multi-crop: sides of extra small crops, e.g. 192 160 128 96 (scales: see view_specs)")
    data.add_argument("--min_scale", type=float, default=0.08, help="RandomResizedCrop's smallest scale")
    data.add_argument("--crop_interpolation", default="bicubic", choices=["bicubic", "bilinear"], help="its resampling")
    data.add_argument("--colour_before_crop", action=argparse.BooleanOptionalAction, default=False,
                      help="colour jitter and grayscale on the whole image, then the crop (CW-RGP, small data)")
    data.add_argument("--jitter", type=float, nargs=4, default=(0.4, 0.4, 0.2, 0.1),
                      help="colour jitter (p 0.8): brightness, contrast, saturation, hue")
    data.add_argument("--grayscale_prob", type=float, default=0.2, help="probability of a gray view")
    data.add_argument("--blur_prob", type=float, nargs=2, default=(1.0, 0.1), help="blur p: view 1, others")
    data.add_argument("--solarize_prob", type=float, nargs=2, default=(0.0, 0.2), help="solarise p: view 1, others")
    data.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, help="normalisation mean (RGB)")
    data.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, help="normalisation std (RGB)")
    data.add_argument("--eval_mean", type=float, nargs=3, default=None,
                      help="mean of un-augmented inputs (5-NN monitor, export); None: --mean")
    data.add_argument("--eval_std", type=float, nargs=3, default=None, help="their std; None: --std")
    data.add_argument("--eval_resize", type=int, default=None,
                      help="their side before the centre crop; None: image_size / 0.875 from 128 px, else image_size")
    data.add_argument("--eval_interpolation", default="bilinear", choices=["bilinear", "bicubic"], help="their resize")

    model = parser.add_argument_group("model")
    model.add_argument("--arch", default="resnet50", choices=intl.RESNETS, help="encoder")
    model.add_argument("--stem", default="imagenet", choices=list(intl.STEMS),
                       help="first layers (README: Presets): torchvision's, INTL's CIFAR network, CW-RGP's")
    model.add_argument("--zero_init_residual", action=argparse.BooleanOptionalAction, default=None,
                       help="start every residual block as the identity; None: for ResNet-50 and larger")
    model.add_argument("--projector", default="8192-8192-8192", help="projector layer widths")
    model.add_argument("--hidden_bias", action=argparse.BooleanOptionalAction, default=False, help="hidden-layer bias")

    method = parser.add_argument_group("method")
    method.add_argument("--method", default="intl", choices=METHODS,
                        help="intl: IterNorm + trace loss; intl-m: with an EMA target; st: g(l) = l^-power; cw-rgp: "
                             "channel whitening, random groups; wmse: Cholesky whitening")
    method.add_argument("--iters", type=int, default=4, help="IterNorm's Newton iterations T")
    method.add_argument("--axis", type=int, default=0, choices=[0, 1], help="0: B x B covariance, 1: D x D")
    method.add_argument("--beta", type=float, default=None,
                        help="trace-loss weight; None: 0.01 (log2(global batch) - 3), log2(D) on axis 1, 0 for st")
    method.add_argument("--momentum", type=float, default=0.996, help="intl-m: EMA momentum, raised to 1 by a cosine")
    method.add_argument("--power", type=float, default=0.5, help="st: the power p (0.5: whitening)")
    method.add_argument("--groups", type=int, default=4, help="cw-rgp: channel groups")
    method.add_argument("--w_size", type=int, default=64, help="cw-rgp, wmse: whitening sub-batch size")
    method.add_argument("--w_iter", type=int, default=1, help="cw-rgp, wmse: repeats with fresh sub-batches")
    method.add_argument("--w_eps", type=float, default=0.0,
                        help="cw-rgp, wmse: whiten (1 - eps) S + eps I, as their authors; st: S + eps mean(l) I")
    method.add_argument("--pair_loss", default="normalized", choices=["normalized", "squared"],
                        help="cw-rgp: 2 - 2 cos between whitened views, or their squared distance")
    method.add_argument("--cov_weight", type=float, default=0.0, help="cw-rgp: weight of the covariance term")
    method.add_argument("--cov_epochs", type=int, default=0, help="cw-rgp: epochs with the covariance term")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=800, help="training epochs")
    optim.add_argument("--batch_size", type=int, default=256, help="the GLOBAL batch: each process takes its share")
    optim.add_argument("--lr", type=float, default=0.3, help="learning rate for a global batch of 256 (scaled)")
    optim.add_argument("--weight_decay", type=float, default=1e-5, help="weight decay")
    optim.add_argument("--decay_all_params", action=argparse.BooleanOptionalAction, default=False,
                       help="weight decay on biases and normalisation parameters too")
    optim.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"], help="sgd: momentum 0.9")
    optim.add_argument("--schedule", default="cosine", choices=["cosine", "cosine-epoch", "step"], help="after warm-up")
    warmup = optim.add_mutually_exclusive_group()
    warmup.add_argument("--warmup_epochs", type=float, default=2, help="linear warm-up")
    warmup.add_argument("--warmup_steps", type=int, default=None, help="the warm-up in steps instead")
    optim.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                       help="autocast; None: Accelerate's config. A preset's fp16 is no on a CPU")
    optim.add_argument("--compile", action="store_true", help="torch.compile the encoder and projector")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", type=intl.folder, help="checkpoints, log, spectrum plot and export")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier run's results in --output_dir")
    run.add_argument("--resume", type=intl.folder, help="'latest' (in --output_dir) or a checkpoint folder")
    run.add_argument("--stop_after_steps", type=int, default=None, help="save and stop after N steps")
    run.add_argument("--save_every", type=int, default=1000, help="checkpoint every N steps and each epoch")
    run.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    run.add_argument("--log_every", type=int, default=10, help="log the loss every N steps")
    run.add_argument("--spectrum_every", type=int, default=100, help="log the spectrum of Z and Z_hat every N steps")
    run.add_argument("--knn_every", type=int, default=0, help="held-out 5-NN accuracy every N epochs (0: never)")
    run.add_argument("--print_config", action="store_true", help="print the resolved configuration and exit")
    run.add_argument("--study", default=None, choices=["power", "trace"],
                     help="the paper's Fig. 2 (st for each p) or Fig. 3 (IterNorm with and without trace loss)")
    run.add_argument("--study_values", type=float, nargs="+", default=None, help="p (0 0.25 ... 1.5) or T (1 2 4 6 8)")
    run.add_argument("--benchmark", type=int, default=0, help="time N training steps on random images")
    return parser


def main(argv=None):
    """--print_config, --benchmark and --study end here; a training run is `train`."""
    config = resolve_config(argv)
    if config.print_config:
        return print(json.dumps(vars(config), indent=2))
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    if config.benchmark:
        return benchmark(config, accelerator)
    with intl.locked(config.output_dir, accelerator.is_main_process):
        if config.study:
            return run_study(config, sys.argv[1:] if argv is None else argv, accelerator)
        train(config, accelerator)


def train(config, accelerator):
    """Pretraining: data -> model -> optimiser -> resume -> the loop over epochs and batches -> export."""
    output_dir = Path(config.output_dir)
    info = tqdm.write if accelerator.is_main_process else (lambda message: None)
    checkpoint = intl.find_checkpoint(config.resume, output_dir) if config.resume else None
    intl.clear_earlier_run(output_dir, RESULTS, config.overwrite, checkpoint, info, accelerator.is_main_process)
    introduce(config, accelerator, info)

    # Data: augmented views of the training split, seeded per (epoch, sample) so that a resume replays them.
    train_split = intl.load_image_split(config.dataset, config.split, config.image_column, config.label_column,
                                        accelerator)
    loader = training_loader(config, train_split, accelerator)
    monitor = Monitor(config, accelerator, loader, knn_splits(config, accelerator, train_split))
    steps_per_epoch, total_steps = monitor.steps_per_epoch, monitor.total_steps

    # Model: built from the same seed on every process, then seeded per process for everything else.
    set_seed(config.seed)
    model = on_the_accelerator(intl.sync_batchnorm(build_model(config), accelerator), config, accelerator.device)
    set_seed(config.seed, device_specific=True)
    model, optimizer = accelerator.prepare(model, build_optimizer(config, model))
    peak_lr = config.lr * config.batch_size / 256
    warmup_steps = round(config.warmup_epochs * steps_per_epoch) if config.warmup_steps is None else config.warmup_steps

    # Resume: model, optimiser and RNG states, the step, and the log up to that step.
    step, last_good = resume(config, accelerator, output_dir, info, monitor) if config.resume else (0, None)
    info(f"{len(train_split.dataset)} training images, {steps_per_epoch} steps per epoch, {total_steps} steps, "
         f"peak lr {peak_lr:.4g}")
    if warmup_steps > total_steps:
        info(f"note: the warm-up ({warmup_steps} steps) outlasts the run: the lr never reaches its peak")
    monitor.start(step, last_good, model)

    model.train()
    try:
        for epoch, batch in batches(loader, step, monitor.stop_at):
            if intl.stop_requested:  # a Ctrl-C or SIGTERM that a finaliser swallowed
                raise KeyboardInterrupt
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr, config.schedule, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if config.method == "intl-m":  # the target moves before the step's forward, with m(step)
                accelerator.unwrap_model(model).update_target(intl.ema_momentum(step, total_steps, config.momentum))
            views = [v.to(accelerator.device, non_blocking=True) for v in batch[0]]
            # The sub-batch methods draw their partitions from the step (alike on every process); epoch ends
            # CW-RGP's covariance term. INTL takes the views only.
            out = model(views, step=step, epoch=epoch) if config.method in ("cw-rgp", "wmse") else model(views)
            monitor.watch.record(out["loss"], step)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(out["loss"])
            optimizer.step()
            step += 1
            monitor.after_step(step, out, lr, model)
    except KeyboardInterrupt:
        raise intl.Interrupted(f"step {step}", monitor.last_good) from None
    finally:
        monitor.progress.close()  # before any error message, so that the message is the last line

    finish(config, accelerator, monitor, step)


def finish(config, accelerator, monitor, step):
    """A finished run exports its backbone, draws spectrum.png and sums up; a stopped one says how to continue."""
    output_dir, export = Path(config.output_dir), Path(config.output_dir) / "backbone"
    if step < monitor.total_steps:
        monitor.info(f"stopped after step {step} of {monitor.total_steps} (--stop_after_steps); the checkpoint is "
                     f"{monitor.last_good}. Continue with: python pretrain.py --output_dir {output_dir} --resume latest")
    elif accelerator.is_main_process:
        backbone, backbone_config = intl.load_backbone(monitor.last_good)
        intl.write_export(export, backbone.state_dict(), backbone_config)
        if plot_spectra(monitor.path, output_dir / "spectrum.png"):
            monitor.info(f"spectrum plot: {output_dir / 'spectrum.png'}")
        local = " --dataset LABELLED_DATA" * bool(backbone_config.get("dataset_is_local_folder"))  # not findable
        monitor.summary(f"done: the backbone is in {export}, the log in {monitor.path}. Next: python linear_eval.py "
                        f"--backbone {export}{local}; to publish it with the results: python linear_eval.py export "
                        f"--source {export} --eval_results RESULT.json --output_dir NEW --push_to_hub REPO")
    accelerator.end_training()


def introduce(config, accelerator, info):
    info(f"{accelerator.num_processes} process(es) on {accelerator.device}, precision {accelerator.mixed_precision}")
    recipe = f"preset {config.preset}" if config.preset else "no preset: the flags and their defaults"
    info(f"{config.method} on {config.dataset} ({recipe}): {config.arch}, {config.image_size} px, global batch "
         f"{config.batch_size} ({config.batch_size // accelerator.num_processes} per process), {config.epochs} "
         f"epoch{'s' * (config.epochs != 1)}")


def batches(loader, step, stop_at):
    """(epoch, batch) from `step` to `stop_at`: each epoch in its own order, a resumed one without its done batches."""
    per_epoch = loader.sampler.batches_per_epoch
    while step < stop_at:
        loader.sampler.set_epoch(step // per_epoch, start_batch=step % per_epoch)
        for batch in loader:
            yield step // per_epoch, batch
            step += 1
            if step == stop_at:
                return


# Spectrum diagnostics (the paper's Fig. 2-3): the condition of the covariance, and whether the embedding collapsed.
# Eigenvalues below RANK_FLOOR x the largest are float32 rounding (about 1e-14 of it), not the embedding's.
RANK_FLOOR = 1e-12


@torch.no_grad()
def covariance_spectrum(z, axis=0):
    """Eigenvalues of the covariance the transformation sees, descending, float64: z [B, D] -> [min(B, D - 1)]
    (axis 0) or [min(D, B - 1)] (axis 1). The others are zero by construction (centring removes a dimension)."""
    x = z.detach().double() if axis == 0 else z.detach().double().t()
    x = x - x.mean(dim=1, keepdim=True)
    eigvals = torch.linalg.eigvalsh(x @ x.t() / (x.shape[1] - 1)).flip(0)
    return eigvals[: min(x.shape[0], x.shape[1] - 1)].cpu()


def lg_ioc(eigvals):
    """lg IoC = log10(l_min / l_max), the paper's condition indicator: 0 when whitened, -inf when rank-deficient."""
    largest, smallest = eigvals.max().item(), eigvals.min().item()
    if largest <= 0 or smallest <= RANK_FLOOR * largest:
        return -math.inf
    return math.log10(smallest / largest)


def effective_rank(eigvals):
    """exp(entropy of the normalised eigenvalues): between 1 (collapsed) and len(eigvals) (uniform)."""
    p = eigvals[eigvals > 0] / eigvals.clamp(min=0).sum()
    return math.exp(-(p * p.log()).sum().item())


def collapsed(z, eigvals):
    """Whether the embeddings z [B, D] collapsed: all samples at about one point (variance over the batch below
    1e-6 of the mean squared norm) or all variance in about one direction (`effective_rank` of eigvals < 1.5)."""
    z = z.detach().double()
    spread = z.var(dim=0, unbiased=False).sum().item()
    return spread <= 1e-6 * z.pow(2).mean(dim=0).sum().item() or effective_rank(eigvals) < 1.5


class Monitor:
    """After every step: the non-finite check, log.jsonl (figures, a collapse warning, the plotted spectra), the
    5-NN monitor, checkpoints; the host reads the device only where it logs or saves."""

    def __init__(self, config, accelerator, loader, knn_data):
        self.config, self.accelerator, self.knn_data = config, accelerator, knn_data
        self.main, self.path = accelerator.is_main_process, Path(config.output_dir) / "log.jsonl"
        self.info = tqdm.write if self.main else (lambda message: None)
        self.steps_per_epoch, self.train_images = loader.sampler.batches_per_epoch, loader.sampler.num_samples
        self.total_steps = config.epochs * self.steps_per_epoch
        self.stop_at = min(self.total_steps, config.stop_after_steps or self.total_steps)
        self.plotted_steps = plotted_steps(self.total_steps, config.spectrum_every)
        self.watch = NonFiniteWatch(accelerator.device)

    def start(self, step, last_good, model):
        """The log, the progress bar and the clock from `step` (a resume drops later records); the 5-NN at step 0."""
        self.last_good, self.collapsed_at = last_good, None  # the newest checkpoint (maybe elsewhere), or none yet
        if self.main:
            if step == 0:  # a new run's log starts empty
                self.path.unlink(missing_ok=True)
            elif not self.path.exists():  # a copied checkpoints/ folder
                self.info(f"no {self.path.name} in {self.path.parent}: the log starts again at step {step} (the "
                          "earlier steps are not in it)")
            else:
                intl.truncate_jsonl(self.path, step)
            self.collapsed_at = next((r["step"] for r in intl.read_jsonl(self.path) if "warning" in r), None)
        if self.knn_data and step == 0:
            self.knn(step, model)
        self.progress = tqdm(total=self.stop_at, initial=step, disable=not self.main, desc="pretrain")
        self.first_step, self.tic = step, time.time()

    def after_step(self, step, out, lr, model):
        config = self.config
        self.progress.update(1)
        epoch_end = step % self.steps_per_epoch == 0
        log_now = step % config.log_every == 0
        spectrum_now = step % config.spectrum_every == 0 or step == self.total_steps
        save_now = step % config.save_every == 0 or epoch_end or step == self.stop_at
        if log_now or spectrum_now or save_now:
            self.watch.check(self.last_good, self.collapsed_at)
        if log_now:
            loss = out["loss"].item()
            speed = (step - self.first_step) * config.batch_size / (time.time() - self.tic)
            self.progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{speed:.0f}")
            self.append({"step": step, "loss": loss, "lr": lr, "epoch": step / self.steps_per_epoch,
                         "images_per_s": speed})
        if spectrum_now and self.main:
            self.spectrum(step, out["z"], out["z_hat"])
        if epoch_end and self.knn_data and (step // self.steps_per_epoch % config.knn_every == 0
                                            or step == self.total_steps):
            self.knn(step, model)
        if save_now:
            self.last_good = save_checkpoint(self.accelerator, config, step, self.steps_per_epoch, self.train_images)

    def knn(self, step, model):
        backbone = self.accelerator.unwrap_model(model).backbone
        (train, train_labels), (test, test_labels) = (intl.extract_features(backbone, loader, self.accelerator)
                                                      for loader in self.knn_data)
        backbone.train()
        top1 = intl.knn_classify(train, train_labels, test, test_labels, k=5, device=self.accelerator.device)["top1"]
        self.info(f"step {step}: 5-NN top-1 {top1:.2f}%")
        self.append({"step": step, "knn_top1": top1})

    def append(self, record):
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def spectrum(self, step, z, z_hat):
        """The condition indicators of Z and Z_hat (the paper's Fig. 3), a warning the first time Z has collapsed, and
        the eigenvalues themselves at the plotted steps."""
        eig_z, eig_z_hat = (covariance_spectrum(x, self.config.axis) for x in (z, z_hat))
        self.append({"step": step, "lg_ioc_z": lg_ioc(eig_z), "lg_ioc_z_hat": lg_ioc(eig_z_hat),
                     "erank_z": effective_rank(eig_z), "erank_z_hat": effective_rank(eig_z_hat)})
        if self.collapsed_at is None and collapsed(z, eig_z):
            warning = (f"the embedding has collapsed at step {step} (effective rank of Z {effective_rank(eig_z):.2f} "
                       f"of {len(eig_z)}): nearly every image maps to one point or one direction, so the features "
                       "carry little information. Check the data (many identical images?), then lr, --beta, --iters")
            self.info(f"warning: {warning}")
            self.append({"step": step, "warning": warning})
            self.collapsed_at = step
        if step in self.plotted_steps:
            self.append({"step": step, "spectrum_z": eig_z.tolist(), "spectrum_z_hat": eig_z_hat.tolist()})

    def summary(self, next_steps):
        """First -> last logged value of the main figures, from the log (so it spans resumes); warnings; next steps."""
        records = intl.read_jsonl(self.path)
        lines = ["summary (first logged -> last logged):"]
        for key, label in (("loss", "loss"), ("knn_top1", "5-NN top-1 (%), held out"), ("lg_ioc_z", "lg IoC of Z"),
                           ("erank_z", "effective rank of Z"), ("lg_ioc_z_hat", "lg IoC of Z_hat"),
                           ("images_per_s", "images/s since the start")):
            values = [f"step {r['step']:6d}: " + ("rank-deficient" if r[key] == -math.inf else f"{r[key]:9.4f}")
                      for r in records if key in r]
            lines += [f"  {label:28s} {values[0]}  ->  {values[-1]}"] if values else []
        lines += [f"warning (step {r['step']}): {r['warning']}" for r in records if "warning" in r]
        self.info("\n".join(lines + [next_steps]))


def knn_splits(config, accelerator, train_split):
    """Loaders of the training and held-out splits without augmentation, or None without labels."""
    if not config.knn_every:
        return None
    if train_split.label_column is None:
        print(f"no kNN monitor: {train_split.source} has no class labels (pretraining needs none)", file=sys.stderr)
        return None
    if config.eval_split == config.split:
        raise ValueError(f"--eval_split {config.eval_split} is the training split of {train_split.source}: the 5-NN "
                         "monitor would report training images as held out; give a held-out --eval_split")
    test_split = intl.load_image_split(config.dataset, config.eval_split, config.image_column, config.label_column,
                                       accelerator)
    transform = intl.eval_transform(config.image_size, config.eval_mean or config.mean, config.eval_std or config.std,
                                    config.eval_resize, config.eval_interpolation)
    return [accelerator.prepare_data_loader(torch.utils.data.DataLoader(
        intl.ImageDataset(split, transform), batch_size=256, num_workers=config.num_workers))
        for split in (train_split, test_split)]


class NonFiniteWatch:
    """Remembers, on the device, the first step whose loss was NaN or Inf, so that the training step never waits
    for the host; `check` reads it (one synchronisation) where the loop reads the device anyway."""

    def __init__(self, device):
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.first_loss = torch.zeros((), device=device)

    def record(self, loss, step):
        first = (self.first_step < 0) & ~torch.isfinite(loss.detach())
        self.first_step = torch.where(first, step, self.first_step)
        self.first_loss = torch.where(first, loss.detach().float(), self.first_loss)

    def check(self, last_good, collapsed_at=None):
        """collapsed_at: the step at which the log says the embedding collapsed, if it did."""
        step = self.first_step.item()
        if step >= 0:
            raise FloatingPointError(
                f"the loss is {self.first_loss.item()} at step {step}; the last good checkpoint is {last_good or 'none'}. "
                "Check the data first: many identical images (blank ones, duplicates) make the covariance singular; "
                "then lower --lr, use --mixed_precision no or fewer --iters (st, cw-rgp, wmse: --w_eps)" +
                ("" if collapsed_at is None else f". Note: the embedding had collapsed at step {collapsed_at} before"))


def resume(config, accelerator, output_dir, info, monitor):
    """Load --resume's checkpoint -> (its step, its folder), refusing one that another setup would continue."""
    def check_state(checkpoint, state):
        if not isinstance(state.get("step"), int):
            raise ValueError(f"{checkpoint / 'trainer_state.json'} holds no step count: the file is damaged; "
                             "resume from another checkpoint")
        if state.get("num_processes", accelerator.num_processes) != accelerator.num_processes:
            raise ValueError(f"{checkpoint} was trained with {state['num_processes']} processes, this run has "
                             f"{accelerator.num_processes}: the global batch, and with it the data order and the "
                             "lr, would change; resume with the same number of processes")
        if state.get("train_images", monitor.train_images) != monitor.train_images:
            raise ValueError(f"{checkpoint} was trained on {state['train_images']} images, --split {config.split} "
                             f"now holds {monitor.train_images}: the steps per epoch and the schedule would change; "
                             "resume on the same data, or start a new run in another --output_dir")

    checkpoint, state = intl.load_checkpoint(accelerator, config.resume, output_dir, check_state=check_state)
    info(f"resumed from {checkpoint} at step {state['step']}")
    return state["step"], checkpoint


# -----------------------------------------------------------------------------
# Configuration


def resolve_config(argv=None):
    """Flags > the launcher's settings > preset > defaults; without --preset and --dataset, the digits preset."""
    parser = get_parser()
    config = parser.parse_args(argv)
    explicit = intl.explicit_flags(parser, argv)
    launcher = {key: os.environ[name] for key, name in LAUNCHER.items() if os.environ.get(name)}
    config.preset = config.preset or (None if config.dataset or config.benchmark else "digits")
    for key, value in {**PRESETS.get(config.preset, {}), **launcher}.items():
        if key not in explicit:
            setattr(config, key, value)
    if config.mixed_precision == "fp16" and "mixed_precision" not in {*explicit, *launcher} and \
            not torch.cuda.is_available():
        config.mixed_precision = "no"  # the recipe's fp16 needs a GPU; on a CPU it runs in float32
    if "warmup_epochs" in explicit:
        config.warmup_steps = None  # the flag given wins over a preset's warm-up in steps
    if config.zero_init_residual is None:
        config.zero_init_residual = config.arch not in ("resnet18", "resnet34")
    if config.resume:
        checkpoint = intl.find_checkpoint(config.resume, config.output_dir)
        intl.keep_resumed_config(config, explicit, checkpoint, (RUN_CONTROL, PER_COMMAND), parser, RANGES,
                                 check_recipe)
    if not (config.print_config or config.benchmark):
        if config.dataset is None and config.preset != "digits":
            raise ValueError(f"--preset {config.preset} needs --dataset: a folder of class sub-folders, a "
                             "save_to_disk folder or a Hub dataset id")
        if config.output_dir is None:
            raise ValueError("--output_dir is required: it receives checkpoints, logs and the exported backbone")
    config.mean, config.std = tuple(config.mean), tuple(config.std)
    intl.check_settings(vars(config), parser, RANGES)
    check_recipe(config)
    if config.study:
        study_runs(config)  # checks --study_values
    if config.beta is None and config.method in ("intl", "intl-m"):  # recorded: the weight used
        config.beta = intl.default_beta(config.batch_size if config.axis == 0 else
                                        intl.parse_projector_spec(config.projector)[-1])
    return config


def check_recipe(config):  # also of a resumed run's saved configuration
    intl.parse_projector_spec(config.projector)
    if config.jitter[3] > 0.5:
        raise ValueError(f"--jitter {' '.join(map(str, config.jitter))}: the hue strength must be at most 0.5")
    if not all(1 <= side <= config.image_size for side in config.small_crops):
        raise ValueError(f"--small_crops {' '.join(map(str, config.small_crops))}: every side must be in [1, "
                         f"--image_size {config.image_size}]")
    if config.num_views + len(config.small_crops) < 2:
        raise ValueError(f"--num_views {config.num_views} without --small_crops: the objective compares views, "
                         "give at least 2")


# -----------------------------------------------------------------------------
# Data: augmented views (BYOL style, as both papers) and a deterministic, sharded, resumable sample order


def view_specs(config):
    """(side, crop scale, blur probability, solarise probability) of every view: the large crops, then the
    small multi-crop ones (a crop of side s takes scales (min_scale * s / image_size, s / image_size), rounded to 3
    decimals as the authors wrote them: 0.171-0.857 for 192 of 224)."""
    blur, solarize = config.blur_prob, config.solarize_prob
    specs = [(config.image_size, (config.min_scale, 1.0), blur[min(i, 1)], solarize[min(i, 1)])
             for i in range(config.num_views)]
    for side in config.small_crops:
        ratio = side / config.image_size
        specs.append((side, (round(config.min_scale * ratio, 3), round(ratio, 3)), blur[1], solarize[1]))
    return specs


def view_transforms(config):
    return [augmentation(side, scale, blur_prob, solarize_prob, config)
            for side, scale, blur_prob, solarize_prob in view_specs(config)]


def augmentation(size, scale, blur_prob, solarize_prob, config):
    """BYOL-style: crop -> colour jitter -> grayscale -> blur -> solarise -> flip -> normalise; with
    --colour_before_crop (CW-RGP on small data): colour jitter -> grayscale -> crop -> flip."""
    interpolation = T.InterpolationMode[config.crop_interpolation.upper()]
    crop = [T.RandomResizedCrop(size, scale=scale, interpolation=interpolation, antialias=True)]
    colour = [T.RandomApply([T.ColorJitter(*config.jitter)], p=0.8), T.RandomGrayscale(p=config.grayscale_prob)]
    return T.Compose([
        *(colour + crop if config.colour_before_crop else crop + colour),
        RandomPILGaussianBlur(blur_prob),
        T.RandomSolarize(threshold=128, p=solarize_prob),
        T.RandomHorizontalFlip(p=0.5),
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(config.mean, config.std),
    ])


class RandomPILGaussianBlur:
    """The authors' blur: with probability p, PIL's GaussianBlur with sigma uniform in [0.1, 2]. Its box blurs have
    no kernel to truncate, unlike a fixed kernel of ~10% of the side (cut at ~2 sigma on small crops)."""

    def __init__(self, p, sigma=(0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, image):
        if self.p == 0 or torch.rand(1).item() >= self.p:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=torch.empty(1).uniform_(*self.sigma).item()))


class AugmentedViews(torch.utils.data.Dataset):
    """(epoch, index) -> ([view_1, ..., view_V], label), augmented with a seed from (seed, epoch, index), so that a
    resumed run replays an uninterrupted one's augmentations whichever worker loads a sample."""

    def __init__(self, split, transforms, seed):
        self.images = intl.ImageDataset(split, transform=None)
        self.transforms, self.seed = transforms, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        image, label = self.images[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, epoch, index)) % 2**63)
            return [transform(image) for transform in self.transforms], label


class ShardedEpochSampler(torch.utils.data.Sampler):
    """(epoch, index) pairs: a permutation per (seed, epoch) cut into global batches (the tail dropped), process r
    taking the r-th slice of each, so all together see one process's batches; set_epoch skips a resume's done ones."""

    def __init__(self, num_samples, batch_size, num_processes, rank, seed):
        self.num_samples, self.batch_size, self.num_processes, self.rank = num_samples, batch_size, num_processes, rank
        self.seed, self.epoch, self.start_batch = seed, 0, 0
        self.batches_per_epoch = num_samples // (batch_size * num_processes)

    def set_epoch(self, epoch, start_batch=0):
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self):
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self):
        order = intl.epoch_order(self.num_samples, self.seed, self.epoch)
        global_batch = self.batch_size * self.num_processes
        for b in range(self.start_batch, self.batches_per_epoch):
            start = b * global_batch + self.rank * self.batch_size
            for index in order[start:start + self.batch_size].tolist():
                yield self.epoch, index


def training_loader(config, train_split, accelerator):
    """This process's share of every global batch, augmented. The loader is not passed through accelerator.prepare:
    its ShardedEpochSampler already shards, and its (epoch, index) keys seed the augmentations."""
    processes = accelerator.num_processes
    per_process = intl.per_process_batch(config.batch_size, processes)
    sampler = ShardedEpochSampler(len(train_split.dataset), per_process, processes, accelerator.process_index,
                                  config.seed)
    images, smallest = len(train_split.dataset), max(2, processes)  # whitening needs 2, each process 1
    if images < smallest:
        raise ValueError(f"the split has {images} image(s), too few for one global batch of {smallest}: add images")
    if sampler.batches_per_epoch == 0:
        raise ValueError(f"the split has {images} images, fewer than one global batch of {config.batch_size}: give "
                         f"--batch_size {images // processes * processes} or less")
    return torch.utils.data.DataLoader(
        AugmentedViews(train_split, view_transforms(config), config.seed), batch_size=per_process,
        sampler=sampler, num_workers=config.num_workers, pin_memory=accelerator.device.type == "cuda",
        persistent_workers=config.num_workers > 0, drop_last=True)


# -----------------------------------------------------------------------------
# Model, optimiser and learning rate


def build_model(config):
    backbone = intl.build_backbone(config.arch, config.stem, config.zero_init_residual)
    projector = intl.build_projector(backbone.feature_dim, config.projector, config.hidden_bias)
    if config.method == "cw-rgp":
        return intl.SubBatchWhitening(backbone, projector, intl.GroupWhitening(config.groups, config.w_eps, config.axis),
                                      config.w_size, config.w_iter, config.pair_loss == "normalized",
                                      (config.cov_weight, config.cov_epochs))
    if config.method == "wmse":
        return intl.SubBatchWhitening(backbone, projector, intl.CholeskyWhitening(config.w_eps), config.w_size,
                                      config.w_iter)
    if config.method == "st":  # the alignment loss alone unless --beta asks for the trace loss too
        transform, beta = intl.PowerTransform(config.power, config.axis, config.w_eps), config.beta or 0.0
    else:
        transform, beta = intl.IterNorm(config.iters, config.axis), config.beta
    return intl.INTL(backbone, projector, transform, beta, momentum_target=config.method == "intl-m")


def on_the_accelerator(model, config, device):
    """On a GPU: channels_last weights (convolutions follow them; tensor cores read NHWC without transposes) and
    cuDNN's autotuner (the input sizes never change). --compile compiles the encoder and projector in place (their
    parameter names stay); the objective (small matrices, Python control flow) stays eager."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    if config.compile:
        model.backbone.compile()
        model.projector.compile()
    return model


def build_optimizer(config, model):
    """SGD with momentum 0.9 or Adam; weight decay on every parameter (--decay_all_params: CIFAR, CW-RGP) or
    not on biases and normalisation parameters (ndim <= 1: INTL on ImageNet)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.ndim > 1 or config.decay_all_params]
    no_decay = [p for p in trained if p.ndim <= 1 and not config.decay_all_params]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=0.0)
    return torch.optim.SGD(groups, lr=0.0, momentum=0.9)


def learning_rate(step, total_steps, warmup_steps, peak_lr, schedule="cosine", steps_per_epoch=1):
    """The authors' schedules after a warm-up of peak_lr x (step + 1) / warmup_steps. cosine (INTL): per step, to
    0.001 x peak_lr at the last; cosine-epoch (CW-RGP ImageNet): peak_lr (1 + cos(pi epoch / epochs)) / 2; step
    (CW-RGP small data): x0.2 at 50 and again at 25 epochs before the end."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "step":
        drops = sum(step >= total_steps - epochs * steps_per_epoch for epochs in (50, 25))
        return peak_lr * 0.2 ** drops
    if schedule == "cosine-epoch":
        epoch, epochs = step // steps_per_epoch, total_steps // steps_per_epoch
        return peak_lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
    progress = (step + 1 - warmup_steps) / max(1, total_steps - warmup_steps)
    end_lr = 0.001 * peak_lr
    return end_lr + (peak_lr - end_lr) * (1 + math.cos(math.pi * progress)) / 2


# -----------------------------------------------------------------------------
# Checkpoints (atomic, explicit names), the backbone export, the spectrum plot


def save_checkpoint(accelerator, config, step, batches_per_epoch, train_images):
    state = {"step": step, "epochs_trained": step / batches_per_epoch, "num_processes": accelerator.num_processes,
             "train_images": train_images, "config": vars(config), "backbone": backbone_config(config)}
    return intl.save_state_atomically(accelerator, Path(config.output_dir) / "checkpoints" / f"step-{step:08d}",
                                      "trainer_state.json", state, config.keep)


# What a backbone's config.json records of the run that made it, saved with every checkpoint (so any checkpoint
# loads as a backbone): its network and evaluation input, and the recipe with its own method's settings only.
RECIPE_KEYS = ("preset", "method", "zero_init_residual", "projector", "hidden_bias", "iters", "axis", "beta",
               "power", "momentum", "groups", "w_size", "w_iter", "w_eps", "pair_loss", "cov_weight", "cov_epochs",
               "num_views", "small_crops", "min_scale", "crop_interpolation", "colour_before_crop", "jitter",
               "grayscale_prob", "blur_prob", "solarize_prob", "mean", "std", "epochs", "batch_size", "lr",
               "weight_decay", "decay_all_params", "warmup_epochs", "warmup_steps", "optimizer", "schedule",
               "mixed_precision", "seed")
METHOD_SETTINGS = {"intl": ("iters", "axis", "beta"), "intl-m": ("iters", "axis", "beta", "momentum"),
                   "st": ("power", "axis", "w_eps", "beta"), "wmse": ("w_size", "w_iter", "w_eps"),
                   "cw-rgp": ("groups", "axis", "w_size", "w_iter", "w_eps", "pair_loss", "cov_weight", "cov_epochs")}


def backbone_config(config):
    others = set().union(*METHOD_SETTINGS.values()) - set(METHOD_SETTINGS[config.method])
    train = {key: value for key, value in vars(config).items() if key not in others and value is not None}
    backbone = {key: train[key] for key in ("arch", "stem", "image_size", "method", "preset", "dataset", "split",
                                            "eval_resize", "eval_interpolation") if key in train}
    if isinstance(config.dataset, str) and (intl.looks_like_path(config.dataset) or os.path.exists(config.dataset)):
        # A backbone may be published: a local folder is named by its last part, never by its path.
        backbone.update(dataset=Path(config.dataset).name, dataset_is_local_folder=True)
    # What a user of the features feeds them: the recipe's evaluation input (cifar100's: CIFAR-10's mean / std).
    return {**backbone, "mean": list(config.eval_mean or config.mean), "std": list(config.eval_std or config.std),
            "recipe": {key: train[key] for key in RECIPE_KEYS if key in train}}


def logged_spectra(log_path):
    """The eigenvalues of Z and Z_hat that a run logged (descending), as [(step, z, z_hat)]."""
    return [(r["step"], r["spectrum_z"], r["spectrum_z_hat"]) for r in intl.read_jsonl(log_path) if "spectrum_z" in r]


def plot_spectra(log_path, path):
    """The paper's Fig. 3 from a run's log, if it holds spectra: the eigenvalues of the covariance of Z and of Z_hat
    at the plotted steps, each divided by its largest, on a log scale down to RANK_FLOOR (rank-deficient ones)."""
    from matplotlib import colormaps

    picks = [(f"step {step}", torch.tensor(z), torch.tensor(z_hat)) for step, z, z_hat in logged_spectra(log_path)]
    if not picks:
        return False
    colours = colormaps["viridis"]([i / max(1, len(picks) - 1) for i in range(len(picks))])
    with two_panels(path, (7.2, 3.2), dpi=200) as (fig, axes):
        for colour, (label, *eigs) in zip(colours, picks):
            for ax, eig in zip(axes, eigs):
                normalised = (eig / eig.max() if eig.max() > 0 else torch.zeros_like(eig)).clamp(min=RANK_FLOOR)
                ioc = lg_ioc(eig)
                ax.plot(range(1, len(eig) + 1), normalised.numpy(), color=colour, linewidth=1.2,
                        label=f"{label}: " + ("rank-deficient" if ioc == -math.inf else f"lg IoC {ioc:.2f}"))
        for ax, name in zip(axes, ("Z (projector output)", r"$\hat{Z}$ (after the transformation)")):
            ax.set(title=name, xlabel="eigenvalue index", ylabel="normalised eigenvalue", yscale="log")
        fig.suptitle(f"{log_path.parent.name}: eigenvalues of the covariance over training", fontsize=9)
    return True


@contextlib.contextmanager
def two_panels(path, size, dpi):
    """Two panels side by side for the block to draw, then their legends and the figure written to `path`."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(1, 2)
    yield fig, axes
    for ax in axes:
        ax.legend(fontsize=7, frameon=False)
    with intl.replacing(path) as tmp:
        fig.savefig(tmp, dpi=dpi)


def plotted_steps(total_steps, spectrum_every, curves=6):
    """The steps whose spectra are logged for spectrum.png, fixed before the run (a resume keeps them): `curves` of
    the steps with spectrum figures (every `spectrum_every`-th and the last), evenly spread, the ends included."""
    logged = -(-total_steps // spectrum_every)  # the last step is logged even off the grid
    picks = {round(i * (logged - 1) / max(1, curves - 1)) for i in range(curves)}  # of the logged ones
    return {min((i + 1) * spectrum_every, total_steps) for i in picks}


# -----------------------------------------------------------------------------
# The paper's experiments at small scale: a loop over short pretraining runs


def run_study(config, argv, accelerator):
    """--study power (Fig. 2: --method st for each p) or trace (Fig. 3: IterNorm with and without the trace loss for
    each T): one short pretraining per setting, each a process of its own with this command's other flags. A run
    that fails (a diverging loss, a singular transform) is recorded with its error, not hidden."""
    if not accelerator.is_main_process:
        return
    output_dir, study, runs = Path(config.output_dir), config.study, study_runs(config)
    base, dropping = [], False  # this command's flags without --study and --study_values and their values
    for arg in argv:
        dropping = arg.split("=")[0] in ("--study", "--study_values") if arg.startswith("--") else dropping
        base += [] if dropping else [arg]
    if config.preset == "digits":  # minutes on a CPU; two identical crops in a batch make S singular without eps
        base = ["--epochs", "5", *(["--w_eps", "1e-3"] if study == "power" else []), *base]
    # An earlier study's summary and runs are replaced only with --overwrite (passed on to the runs).
    intl.clear_earlier_run(output_dir, [f"{study}_study.json", f"{study}_study.png"] + [name for _, _, name in runs],
                           config.overwrite)
    rows = []
    for settings, flags, name in tqdm(runs, desc=f"{study} study"):  # each run's own flags win: they come last
        result = subprocess.run([sys.executable, __file__, *base, *flags, "--output_dir", str(output_dir / name)],
                                capture_output=True, text=True)
        records = intl.read_jsonl(output_dir / name / "log.jsonl")
        error = result.stderr.strip().splitlines()[-1] if result.returncode else ""
        # A failed run has no final figures: its last logged ones (e.g. the kNN at initialisation) would mislead.
        final = {key: None if error else next((r[key] for r in reversed(records) if key in r), None)
                 for key in ("loss", "knn_top1", "lg_ioc_z", "lg_ioc_z_hat", "erank_z")}
        rows.append({**settings, "run": name, **final, "steps": max((r["step"] for r in records), default=0),
                     "error": error})
        tqdm.write(f"{name}: {json.dumps(rows[-1])}")
    intl.write_text_atomically(output_dir / f"{study}_study.json", json.dumps(rows, indent=2))
    plot_study(study, rows, output_dir / f"{study}_study.png")
    print(f"{study} study: {len(rows)} runs -> {output_dir}/{study}_study.{{json,png}}")


def study_runs(config):
    """(the settings in the table, the run's flags, its folder) of each run of the study."""
    if config.study == "power":
        powers = config.study_values or [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5]  # RANGES: p >= 0
        return [({"power": p}, ["--method", "st", "--power", str(p)], f"power-{p:g}") for p in powers]
    counts = config.study_values or [1, 2, 4, 6, 8]
    if not all(t >= 1 and t == int(t) for t in counts):
        raise ValueError(f"--study_values {' '.join(map(str, counts))}: give iteration counts T >= 1 (integers)")
    # Each T with the trace loss (the default beta), then without it.
    return [({"iters": t, "trace_loss": tl}, ["--iters", str(t), *([] if tl else ["--beta", "0"])],
             f"T{t}-{'' if tl else 'no-'}tl") for t in map(int, counts) for tl in (True, False)]


def plot_study(study, rows, path):
    """lg IoC of Z and Z_hat and the 5-NN accuracy against p or T (a red line where a run failed)."""
    x, label = ("power", "power p of g(l) = l^-p") if study == "power" else ("iters", "IterNorm iterations T")
    series = [("", rows)] if study == "power" else [(f" {kind} trace loss", [r for r in rows if r["trace_loss"] == on])
                                                    for kind, on in (("with", True), ("without", False))]
    floor = math.log10(RANK_FLOOR)  # a rank-deficient covariance (lg IoC -inf) is drawn at the floor
    with two_panels(path, (10, 4), dpi=120) as (_, (ax_ioc, ax_knn)):
        for suffix, part in series:
            ok = [r for r in part if not r["error"]]
            for ax, key, style, name in ((ax_ioc, "lg_ioc_z", "o-", "Z"), (ax_ioc, "lg_ioc_z_hat", "s--", "Z_hat"),
                                         (ax_knn, "knn_top1", "o-", "5-NN")):
                values = [None if r[key] is None else max(r[key], floor) for r in ok]  # None: not measured
                ax.plot([r[x] for r in ok], values, style, label=name + suffix)
        for r in rows:
            if r["error"]:
                ax_knn.axvline(r[x], color="red", alpha=0.3)
        ax_ioc.set(xlabel=label, ylabel="lg IoC = log10(l_min / l_max)",
                   title="condition of the covariance (-12: singular)")
        ax_knn.set(xlabel=label, ylabel="held-out 5-NN top-1 (%)", title="accuracy (red: run failed)")


# -----------------------------------------------------------------------------
# --benchmark (.ci/bench.py compares this step with a plain PyTorch loop)


def benchmark(config, accelerator):
    """--benchmark N: the training step's time, images/s, peak memory (CPU: resident set; GPU: allocated) on random
    images, and the objective's (whitening and loss) share of the step."""
    device, cuda = accelerator.device, accelerator.device.type == "cuda"
    set_seed(config.seed)
    model = on_the_accelerator(build_model(config), config, device)
    model, optimizer = accelerator.prepare(model, build_optimizer(config, model))  # lr 0: the same work
    sides = [side for side, *_ in view_specs(config)]
    views = [torch.randn(config.batch_size, 3, side, side, device=device) for side in sides]
    dim = intl.parse_projector_spec(config.projector)[-1]
    embeddings = [torch.randn(config.batch_size, dim, device=device, requires_grad=True) for _ in sides]
    watch = NonFiniteWatch(device)

    def train_step():  # the step of the training loop
        out = model(views)
        watch.record(out["loss"], 0)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(out["loss"])
        optimizer.step()

    def objective_step():
        with accelerator.autocast():
            loss = accelerator.unwrap_model(model).objective(embeddings)["loss"]
        loss.backward()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s = timed(train_step, config.benchmark, device, warmup=3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    objective_s = timed(objective_step, config.benchmark, device)
    figures = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu, {torch.get_num_threads()} threads",
               "precision": accelerator.mixed_precision, "step_s": float(f"{step_s:.4g}"),
               "images_per_s": round(config.batch_size * accelerator.num_processes / step_s, 1),
               "peak_memory_mib": round(peak), "objective_s": float(f"{objective_s:.4g}"),
               "objective_share": float(f"{objective_s / step_s:.4g}")}
    print(json.dumps(figures, indent=2))
    return figures


def timed(fn, steps, device, warmup=1):
    """Seconds per call of fn, after `warmup` calls (they choose cuDNN's kernels and grow the memory pools)."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    synchronize()
    tic = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize()
    return (time.perf_counter() - tic) / steps


if __name__ == "__main__":
    intl.run(main)
