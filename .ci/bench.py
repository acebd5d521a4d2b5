#!/usr/bin/env python3
"""Our measuring tools, not part of the product: the figures the README quotes, one JSON line per part.

    python .ci/bench.py                  # on a GPU: ResNet-50, 224 px, batch 128 (what .ci/gpu-check runs)
    python .ci/bench.py --quick          # tiny sizes: runs on a CPU in a minute or two

Parts (--parts):
  step     pretrain's training step (`pretrain.py --benchmark`) against the same model, objective and optimiser in
           the obvious PyTorch loop (no Accelerate), as most people write it and with our channels_last + cuDNN
           autotuner, in each --precision.
  augment  images/s on one core of the per-image PIL pipeline (the data loader workers' work) on generated JPEGs.
  intl-m   INTL-M's recipe (preset intl-m-100ep: 2 x 224 px + 192/160/128/96 px crops) end to end on generated
           500 x 375 JPEGs with every core as a loader worker, next to the backbone alone (fp16 on a GPU,
           channels_last) on the same views on the same card. The goal: the run at >= 80% of the backbone's rate.
  detect   detect_transfer's training iteration (Faster / Mask R-CNN C4, ResNet-50, 2 images of 800 x 1067 per
           process; quick: ResNet-18, 96 x 128) on random images with three boxes: seconds and peak memory.
  knn      the 5-NN (intl.knn_classify) at ImageNet size, 1,281,167 x 50,000 features of 2048 (quick: 3,000 x 200 x
           16): seconds and peak memory (on a GPU: allocated; the features stay on the CPU and go over in blocks).
"""

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import detect_transfer  # noqa: E402
import intl  # noqa: E402
import pretrain  # noqa: E402

# The sizes: model flags, batch, generated photos, steps of the end-to-end run, INTL-M's small crops at that size.
FULL = (["--arch", "resnet50", "--image_size", "224", "--projector", "8192-8192-8192"], 128, 4096, 30, [])
QUICK = (["--arch", "resnet18", "--image_size", "32", "--projector", "64-64-64"], 8, 48, 6,
         ["--small_crops", "28", "24", "20", "16"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU")
    parser.add_argument("--parts", nargs="+", default=["step", "augment", "intl-m", "detect", "knn"],
                        choices=["step", "augment", "intl-m", "detect", "knn"])
    parser.add_argument("--precision", nargs="+", default=None, choices=["no", "fp16", "bf16"],
                        help="of the step part (default: fp16 and bf16 on a GPU, no on a CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps of the step part (default: 20, quick 2)")
    parser.add_argument("--compile", action="store_true", help="the step part with --compile")
    args = parser.parse_args()
    model, batch, photos, run_steps, small_crops = QUICK if args.quick else FULL
    model += ["--batch_size", str(batch)]
    if "step" in args.parts:
        for precision in args.precision or (["fp16", "bf16"] if torch.cuda.is_available() else ["no"]):
            steps = args.steps or (2 if args.quick else 20)
            print(json.dumps(step_against_plain_loop(model + ["--compile"] * args.compile, precision, steps)))
    if {"augment", "intl-m"} & set(args.parts):
        with tempfile.TemporaryDirectory(prefix="intl-bench-") as work:
            folder, cores = Path(work) / "photos", os.cpu_count()
            with multiprocessing.Pool(cores) as pool:
                pool.starmap(write_synthetic_photos, [(folder, range(i, photos, cores), 4) for i in range(cores)])
            if "augment" in args.parts:
                print(json.dumps(augmentation_per_core(folder, min(photos, 200))))
            if "intl-m" in args.parts:
                print(json.dumps(intl_m_end_to_end(folder, model + small_crops, batch, run_steps, work)))
    if "detect" in args.parts:
        for model_name in detect_transfer.MODELS:
            print(json.dumps(detection_iteration(model_name, *(("resnet18", 96, 128) if args.quick else
                                                                ("resnet50", 800, 1067)))))
    if "knn" in args.parts:
        print(json.dumps(knn_at_scale(*((3000, 200, 16) if args.quick else (1281167, 50000, 2048)))))


def step_against_plain_loop(flags, precision, steps):
    AcceleratorState._reset_state(reset_partial_state=True)
    config = pretrain.resolve_config(["--benchmark", str(steps), "--mixed_precision", precision, *flags])
    accelerator = Accelerator(mixed_precision=precision)
    with contextlib.redirect_stdout(io.StringIO()):  # its figures come back in the one line of this part
        figures = pretrain.benchmark(config, accelerator)
    device = accelerator.device
    views = [torch.randn(config.batch_size, 3, side, side, device=device) for side, *_ in pretrain.view_specs(config)]
    for name, tuned in (("plain_loop", False), ("plain_loop_channels_last", True)):
        seconds = pretrain.timed(plain_loop_step(config, views, device, precision, tuned), steps, device, warmup=3)
        figures[f"{name}_step_s"], figures[f"speed_vs_{name}"] = round(seconds, 4), round(seconds / figures["step_s"], 3)
    return figures


def plain_loop_step(config, views, device, precision, tuned):
    """The obvious loop's step for the same model, objective and optimiser: autocast and a gradient scaler by hand,
    no Accelerate, no non-finite watch. tuned: with channels_last and cuDNN's autotuner, as `on_the_accelerator`."""
    set_seed(config.seed)
    torch.backends.cudnn.benchmark = False
    model = pretrain.build_model(config).to(device)
    if tuned:
        model = pretrain.on_the_accelerator(model, config, device)
    elif config.compile:
        model.backbone.compile()
        model.projector.compile()
    optimizer = pretrain.build_optimizer(config, model)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(views)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return step


def augmentation_per_core(folder, images):
    """The papers' per-image pipeline (decode, crops, colour, blur, ...) of two recipes, on one thread."""
    torch.set_num_threads(1)
    split = intl.load_image_split(str(folder), "train")
    figures = {"images": images}
    for preset in ("imagenet-800ep", "intl-m-100ep"):
        config = pretrain.resolve_config(["--preset", preset, "--print_config"])
        data = pretrain.AugmentedViews(split, pretrain.view_transforms(config), config.seed)
        tic = time.perf_counter()
        for index in range(images):
            data[(0, index)]
        figures[f"{preset}_images_per_s_per_core"] = round(images / (time.perf_counter() - tic), 1)
    torch.set_num_threads(os.cpu_count())
    return figures


def intl_m_end_to_end(folder, flags, batch, steps, work):
    """Pretraining with the intl-m preset for `steps` steps, its images/s over the last two thirds of them (the first
    ones start the workers and choose kernels), against the backbone alone on the same views."""
    log = Path(work) / "run" / "log.jsonl"
    every = max(1, steps // 3)
    subprocess.run([sys.executable, str(ROOT / "pretrain.py"), "--preset", "intl-m-100ep", "--dataset", str(folder),
                    "--output_dir", str(log.parent), *flags, "--num_workers", str(os.cpu_count()), "--epochs", "1",
                    "--stop_after_steps", str(steps), "--log_every", str(every), "--spectrum_every", "100000",
                    "--knn_every", "0", "--save_every", "100000"], check=True, cwd=ROOT)
    rows = {r["step"]: r for r in intl.read_jsonl(log) if "images_per_s" in r}
    seconds = {step: step * batch / r["images_per_s"] for step, r in rows.items()}  # images_per_s: since the start
    run = (steps - every) * batch / (seconds[steps] - seconds[every])
    config = pretrain.resolve_config(["--preset", "intl-m-100ep", "--print_config", *flags])
    backbone = batch / backbone_step_seconds(config)
    return {"views": [side for side, *_ in pretrain.view_specs(config)], "arch": config.arch, "batch": batch,
            "loader_workers": os.cpu_count(), "device": torch.cuda.get_device_name() if torch.cuda.is_available()
            else "cpu", "intl_m_images_per_s": round(run, 1), "backbone_alone_images_per_s": round(backbone, 1),
            "ratio": round(run / backbone, 3), "goal": 0.8}


def backbone_step_seconds(config, steps=10):
    """The encoder alone (no projector, no objective, no data loading) on random views of the recipe's sizes: a
    forward, a backward of its features' mean and an SGD step, channels_last, fp16 autocast on a GPU."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_seed(config.seed)
    backbone = pretrain.on_the_accelerator(intl.build_backbone(config.arch, config.stem, config.zero_init_residual)
                                           .to(device), argparse.Namespace(compile=False), device)
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    views = [torch.randn(config.batch_size, 3, side, side, device=device) for side, *_ in pretrain.view_specs(config)]

    def step():
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            loss = sum(backbone(v).float().mean() for v in views)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return pretrain.timed(step, steps, device, warmup=3)


def write_synthetic_photos(folder, indices, classes=1):
    """FOLDER/class_c/i.jpg for each i of `indices`: 500 x 375 JPEGs (ImageNet's typical size) of smooth colour
    waves and noise, image i of class i % classes, each seeded by its index."""
    y, x = np.mgrid[0:375, 0:500]
    for i in indices:
        generator = np.random.default_rng(i)
        waves = [np.sin(x / generator.uniform(5, 60) + generator.uniform(0, 6)) * np.cos(y / generator.uniform(5, 60))
                 for _ in range(3)]
        pixels = np.stack(waves, -1) * 100 + 127 + generator.normal(0, 8, (375, 500, 3))
        (Path(folder) / f"class_{i % classes}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(Path(folder) / f"class_{i % classes}" / f"{i}.jpg",
                                                                   quality=90)



def detection_iteration(model_name, arch, height, width, iterations=3):
    """Seconds per training iteration of a detector (after one warm-up) on random images, fp16 on a GPU."""
    AcceleratorState._reset_state(reset_partial_state=True)
    config = detect_transfer.resolve_config(["--print_config", "--model", model_name, "--arch", arch, "--backbone",
                                             "random", "--train_sizes", str(height), "--max_size", str(width)])
    accelerator = Accelerator(mixed_precision="fp16" if torch.cuda.is_available() else "no")
    set_seed(0)
    backbone, config = detect_transfer.load_detection_backbone(config, random=True)
    model = detect_transfer.build_detector(config, backbone, len(detect_transfer.VOC_CLASSES))
    optimizer = torch.optim.SGD(detect_transfer.parameter_groups(model, 1e-4), lr=0.001, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.4, 0.3, 0.9, 0.9], [0.2, 0.5, 0.4, 0.95]]) * torch.tensor(
        [width, height] * 2)
    images = [torch.rand(3, height, width, device=accelerator.device) for _ in range(2)]
    targets = [{"boxes": boxes.to(accelerator.device), "labels": torch.tensor([1, 2, 3], device=accelerator.device),
                "masks": torch.zeros(3, height, width, dtype=torch.uint8, device=accelerator.device)} for _ in images]
    for target in targets:
        for mask, (x1, y1, x2, y2) in zip(target["masks"], boxes.round().int().tolist()):
            mask[y1:y2, x1:x2] = 1
    model.train()
    timings = []
    for _ in range(iterations + 1):  # the first is a warm-up
        tic = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - tic)
    peak = torch.cuda.max_memory_allocated() if accelerator.device.type == "cuda" else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"part": "detect", "model": model_name, "arch": arch, "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision, "images_per_iteration": len(images),
            "input": [height, width], "seconds_per_iteration": round(float(np.mean(timings[1:])), 4),
            "peak_memory_gib": round(peak / 2**30, 3)}


def knn_at_scale(n_train, n_test, dim, k=5):
    """intl.knn_classify on random non-negative features (like ReLU features) and 1,000 classes."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    train, test = torch.empty(n_train, dim), torch.empty(n_test, dim)
    for features in (train, test):  # filled in place: no temporary the size of the set adds to the peak
        for start in range(0, len(features), 65536):
            features[start:start + 65536].uniform_(generator=generator)
    labels = [torch.randint(0, 1000, (n,), generator=generator) for n in (n_train, n_test)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    intl.knn_classify(train, labels[0], test, labels[1], k=k, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kB
    return {"part": "knn", "n_train": n_train, "n_test": n_test, "dim": dim, "k": k, "device": str(device),
            "seconds": round(time.perf_counter() - tic, 3), "features_gib": round((train.nbytes + test.nbytes) / 2**30, 3),
            "peak_memory_gib": round(peak / 2**30, 3)}

if __name__ == "__main__":
    main()
