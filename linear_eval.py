"""Evaluate a pretrained backbone by the papers' protocols, with Hugging Face Accelerate.

    python linear_eval.py --backbone runs/digits/backbone            # offline: 5-NN + linear on cached features
    python linear_eval.py --backbone someone/intl-resnet50 --protocol knn --knn_metric cosine --dataset DATA
    accelerate launch linear_eval.py --backbone runs/in1k/backbone --protocol linear \\
        --dataset ILSVRC/imagenet-1k --test_split validation
    accelerate launch linear_eval.py --backbone intl_800ep.pth.tar --recipe intl --arch resnet50 \\
        --protocol finetune --subset_file 1percent.txt --dataset /data/imagenet
    python linear_eval.py --benchmark_knn 1281167 50000 2048         # the 5-NN at ImageNet size: time, memory

Protocols (the papers' evaluation protocols; batches are global, all processes together):
    knn            k-NN on frozen features: k = 5, Euclidean, one vote each, a tie between classes to the
                   smallest class id (the papers'); or weighted cosine votes exp(sim / T) with k = 20 / 200,
                   T = 0.07 (--knn_metric cosine)
    linear-cached  features extracted once without augmentation; a linear head trained on them with
                   Adam, lr 1e-2 decayed exponentially to 1e-6 over 500 epochs, wd 5e-6, batch 1000
    linear         the ImageNet protocol: frozen backbone in eval mode, fc from N(0, 0.01), SGD momentum
                   0.9 without wd, batch 256, lr 0.2 (INTL) / 0.4 (INTL-M), 100 epochs, x0.1 at 60 and 80,
                   bilinear RandomResizedCrop + flip / Resize + CenterCrop; afterwards a check that no
                   backbone weight or BN buffer changed
    finetune       semi-supervised: all layers trained for 20 epochs at a constant lr (head 0.2, backbone
                   0.006 INTL / 0.004 INTL-M), batch 256, on the images named in --subset_file (the standard
                   1% / 10% lists) or, not comparable to the papers, a random --train_fraction

The backbone is any source intl.load_backbone accepts: an export folder, a .safetensors file, a Hub
repo id (owner/name[@revision]), a pretrain checkpoint folder or an official .pth.tar. The reported
number is the final epoch's top-1 / top-5 (the best epoch is listed as a labelled extra), printed as
a table and written to OUTPUT_DIR/<protocol>.json (by default OUTPUT_DIR is eval/<backbone name> next to the
backbone: one folder per backbone). Results already there are replaced only with --overwrite. linear and
finetune save a checkpoint every epoch and continue with --resume.
"""

import argparse
import contextlib
import copy
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

import intl

PROTOCOLS = ("knn", "linear-cached", "linear", "finetune")
# Per-protocol defaults of the flags left at None (the papers' evaluation protocols). Batches are global (all
# processes together). SGD learning rates are for a global batch of 256 and scale linearly with it; Adam's
# (linear-cached) does not scale. The learning rates missing here depend on the recipe, below.
DEFAULTS = {
    "linear-cached": dict(epochs=500, batch_size=1000, lr=1e-2, weight_decay=5e-6),
    "linear": dict(epochs=100, batch_size=256, weight_decay=0.0),
    "finetune": dict(epochs=20, batch_size=256, lr=0.2, weight_decay=0.0),
}
# The authors' ImageNet evaluation learning rates differ by the backbone's pretraining recipe: the linear head
# (INTL 800 ep and ImageNet-100: 0.2; INTL-M: 0.4) and the fine-tuned backbone (0.006; 0.004).
RECIPE_LRS = {
    "intl": {"linear": {"lr": 0.2}, "finetune": {"lr_backbone": 0.006}},
    "intl-m": {"linear": {"lr": 0.4}, "finetune": {"lr_backbone": 0.004}},
}
RECIPE_NAMES = {"intl": "INTL", "intl-m": "INTL-M"}
TRAINED = ("linear", "finetune")  # the protocols that train on images, with a checkpoint every epoch
# The valid range of every numeric flag (intl.check_ranges), checked before any work.
RANGES = {"image_size": "[1, inf)", "mean": "(-inf, inf)", "std": "(0, inf)", "num_workers": "[0, inf)",
          "eval_batch_size": "[1, inf)", "k": "[1, inf)", "temperature": "(0, inf)", "train_fraction": "(0, 1]",
          "seed": "[0, 4294967295]", "epochs": "[1, inf)", "batch_size": "[1, inf)", "lr": "(0, inf)",
          "lr_backbone": "[0, inf)", "min_lr": "[0, inf)", "weight_decay": "[0, inf)", "milestones": "[0, 1]",
          "eval_every": "[1, inf)", "stop_after_epochs": "[1, inf)", "benchmark_knn": "[1, inf)"}


def get_parser():
    parser = argparse.ArgumentParser(description="Evaluate a pretrained INTL backbone (kNN, linear, fine-tuning)",
                                     allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    # Data
    parser.add_argument("--dataset", type=str, default="digits",
                        help="Hub dataset id, a folder of class sub-folders, a save_to_disk folder, or 'digits'")
    parser.add_argument("--train_split", type=str, default="train", help="labelled split the classifiers learn from")
    parser.add_argument("--test_split", type=str, default="test",
                        help="labelled split the accuracy is measured on ('validation' / 'val' stand in for it)")
    parser.add_argument("--image_column", type=str, default=None, help="image column (default: detected)")
    parser.add_argument("--label_column", type=str, default=None, help="label column (default: detected)")
    parser.add_argument("--image_size", type=int, default=None,
                        help="input side in pixels (default: the backbone's pretraining size); 224 gives "
                             "Resize 256 + CenterCrop 224 for evaluation")
    parser.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean (default: the backbone's)")
    parser.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std (default: the backbone's)")
    parser.add_argument("--num_workers", type=int, default=2, help="data loader processes per evaluation process")
    parser.add_argument("--eval_batch_size", type=int, default=256,
                        help="batch per process for feature extraction and test-set evaluation")

    # Model
    parser.add_argument("--backbone", type=str, default=None,
                        help="(required) export folder, .safetensors file, Hub repo id 'owner/name[@revision]', "
                             "pretrain checkpoint folder or official INTL / CW-RGP .pth.tar")
    parser.add_argument("--arch", type=str, default=None, choices=intl.RESNETS,
                        help="encoder architecture (default: from the backbone's config or its weights' shapes)")
    parser.add_argument("--revision", type=str, default=None, help="Hub branch, tag or commit of --backbone")
    parser.add_argument("--stem", type=str, default=None, choices=list(intl.STEMS),
                        help="the backbone's first layers when its config does not say them (an official "
                             "checkpoint: 'cifar' for INTL's 3x3 conv1, 'cifar-unpadded' for CW-RGP's; give "
                             "'small-maxpool' for CW-RGP's STL-10 / Tiny-ImageNet networks)")

    # Protocol
    parser.add_argument("--protocol", type=str, nargs="+", default=["knn", "linear-cached"], choices=PROTOCOLS,
                        help="one or more evaluations; knn and linear-cached share one feature extraction")
    parser.add_argument("--knn_metric", type=str, default="euclidean", choices=["euclidean", "cosine"],
                        help="euclidean: one vote per neighbour (the papers'); cosine: votes weighted by "
                             "exp(cosine similarity / T)")
    parser.add_argument("--k", type=int, nargs="+", default=None,
                        help="numbers of neighbours (default: 5 for euclidean, 20 and 200 for cosine)")
    parser.add_argument("--temperature", type=float, default=0.07, help="T of the weighted-cosine kNN")
    parser.add_argument("--subset_file", type=str, default=None,
                        help="finetune: text file of image file names, one a line: the standard ImageNet 1%% / "
                             "10%% lists, as the papers' semi-supervised results")
    parser.add_argument("--train_fraction", type=float, default=None,
                        help="finetune, instead of --subset_file: a random class-balanced fraction of the "
                             "training split, drawn with --seed; NOT comparable to the papers' numbers, which "
                             "use the standard lists (--subset_file)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head's init, the data order and subsets")

    # Optim
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: linear-cached 500, linear 100, finetune 20)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="GLOBAL training batch, all processes together (default: linear-cached 1000, linear "
                             "and finetune 256, the authors' global batches); linear and finetune split it evenly "
                             "over the processes, so it must be divisible by their number")
    parser.add_argument("--recipe", type=str, default=None, choices=sorted(RECIPE_LRS),
                        help="the backbone's pretraining recipe, which picks the authors' learning rates: linear "
                             "head 0.2 (intl) / 0.4 (intl-m), finetune backbone 0.006 / 0.004 (default: the method "
                             "recorded in the backbone's config.json; official .pth.tar checkpoints record none, "
                             "and then INTL's are used and the run says so)")
    parser.add_argument("--lr", type=float, default=None,
                        help="head learning rate (default: linear-cached 1e-2 with Adam; with SGD, per 256 images "
                             "of global batch: linear 0.2 for INTL / 0.4 for INTL-M (see --recipe), finetune 0.2)")
    parser.add_argument("--lr_backbone", type=float, default=None,
                        help="finetune: backbone learning rate per 256 images of global batch (default: 0.006 for "
                             "INTL / 0.004 for INTL-M, see --recipe)")
    parser.add_argument("--min_lr", type=float, default=1e-6,
                        help="linear-cached: the learning rate reached by the exponential decay at the last epoch")
    parser.add_argument("--weight_decay", type=float, default=None,
                        help="weight decay (default: linear-cached 5e-6, linear and finetune 0)")
    parser.add_argument("--milestones", type=float, nargs="+", default=[0.6, 0.8],
                        help="linear: lr x0.1 after these fractions of --epochs (epochs 60 and 80 of 100); "
                             "finetune keeps its lr constant (the authors' milestones 60 and 80 lie beyond its "
                             "20 epochs)")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"],
                        help="autocast precision (default: Accelerate's config)")

    # Output
    parser.add_argument("--output_dir", type=str, default=None,
                        help="where <protocol>.json and checkpoints/ go (default: eval/<backbone name> next to a "
                             "local backbone, in its run folder for a checkpoint (OUTPUT_DIR/eval/step-N); "
                             "runs/eval/<repo>[--<revision>] for a Hub id): one folder per backbone")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results (<protocol>.json) and checkpoints of the same protocols already in "
                             "--output_dir; without it such a folder is refused before any work")
    parser.add_argument("--eval_every", type=int, default=1,
                        help="linear, finetune: test accuracy every N epochs (always after the last)")
    parser.add_argument("--resume", action="store_true",
                        help="linear, finetune: continue from the latest checkpoint in OUTPUT_DIR/checkpoints/<protocol>")
    parser.add_argument("--stop_after_epochs", type=int, default=None,
                        help="linear, finetune: save and stop after this many epochs (the schedule still spans "
                             "--epochs); continue with --resume")

    # Benchmark
    parser.add_argument("--benchmark_knn", type=int, nargs=3, default=None, metavar=("N_TRAIN", "N_TEST", "DIM"),
                        help="time the 5-NN (intl.knn_classify) on random float32 features of this size, on the "
                             "GPU if there is one, print JSON (seconds, peak memory) and exit; needs no --backbone "
                             "(ImageNet: 1281167 50000 2048)")
    return parser


def main(argv=None):
    args = resolve_args(argv)
    if args.benchmark_knn:
        print(json.dumps(benchmark_knn(*args.benchmark_knn), indent=2))
        return
    output_dir = Path(args.output_dir)
    if not args.resume:  # a resumed evaluation continues the results in output_dir: they are its own
        intl.refuse_to_replace(output_dir, [f"{p}.json" for p in args.protocol] +
                               [f"checkpoints/{p}" for p in args.protocol if p in TRAINED], args.overwrite)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    if warning := intl.slow_precision_warning(accelerator):
        print(warning, file=sys.stderr)
    say = tqdm.write if accelerator.is_main_process else (lambda *_: None)
    trained = [p for p in args.protocol if p in TRAINED]
    for protocol in trained:  # before any loading: a batch that does not split is refused at once
        per_process_batch(protocol_settings(protocol, args)["batch_size"], accelerator.num_processes)

    # Model: any backbone source, loaded strictly, frozen.
    backbone, backbone_config = intl.load_backbone(args.backbone, args.arch, args.revision, args.stem)
    backbone.requires_grad_(False).to(accelerator.device)
    # The input the backbone was trained for, unless given: from here on, args holds the values used.
    args = argparse.Namespace(**{**vars(args), "image_size": args.image_size or backbone_config["image_size"],
                                 "mean": args.mean or backbone_config["mean"], "std": args.std or backbone_config["std"],
                                 "eval_resize": None if args.image_size else backbone_config.get("eval_resize")})
    image_size = args.image_size
    say(f"{accelerator.num_processes} process(es) on {accelerator.device}; backbone {args.backbone}: "
        f"{backbone_config['arch']}, {backbone_config['feature_dim']}-d features, input {image_size} px")
    recipe = evaluation_recipe(args.recipe, backbone_config) if trained else None
    for protocol in trained:
        say(recipe_lr_note(protocol, recipe, args))

    # Data: a labelled training split and a labelled test split.
    train_split, test_split, num_classes = load_labelled_splits(args, accelerator)
    data = dict(dataset=args.dataset, train_split=split_used(train_split, args.train_split), test_split=split_used(test_split, args.test_split),
                n_train=len(train_split.dataset), n_test=len(test_split.dataset), num_classes=num_classes)
    say(f"{args.dataset}: {data['n_train']} training and {data['n_test']} test images, {num_classes} classes")
    eval_images = intl.eval_transform(image_size, args.mean, args.std, args.eval_resize)  # CW-RGP STL-10: 70 for 64

    # Frozen features, extracted once without augmentation, for knn and linear-cached.
    if {"knn", "linear-cached"} & set(args.protocol):
        features = {name: extract(backbone, split, eval_images, name, args, accelerator)
                    for name, split in (("train", train_split), ("test", test_split))}

    records = []
    for protocol in args.protocol:
        tic = time.time()
        if protocol == "knn":
            record = run_knn(features, args, accelerator.device)
        elif protocol == "linear-cached":
            record = run_linear_cached(features, num_classes, args, accelerator)
        else:
            try:
                record = run_trained_protocol(protocol, backbone, (train_split, test_split, num_classes), args,
                                              accelerator, recipe)
            except KeyboardInterrupt:
                raise intl.Interrupted(interrupted_message(protocol, output_dir)) from None
            if record is None:  # --stop_after_epochs
                return
        record = {"protocol": protocol, **record, "backbone": args.backbone, "arch": backbone_config["arch"],
                  "image_size": image_size, **data, "processes": accelerator.num_processes,
                  "seconds": round(time.time() - tic, 2)}
        records.append(record)
        if accelerator.is_main_process:
            intl.write_text_atomically(output_dir / f"{protocol}.json", json.dumps(record, indent=2) + "\n")
    say(results_table(records, data, output_dir))
    accelerator.end_training()


# -----------------------------------------------------------------------------
# Configuration and data


def resolve_args(argv=None):
    args = get_parser().parse_args(argv)
    if args.benchmark_knn:
        intl.check_ranges(args, {"benchmark_knn": RANGES["benchmark_knn"]})
        return args
    if args.backbone is None:
        raise ValueError("--backbone is required: an export folder, a .safetensors file, a Hub repo id, a pretrain "
                         "checkpoint folder or an official .pth.tar checkpoint")
    if args.k is None:
        args.k = [5] if args.knn_metric == "euclidean" else [20, 200]
    if "finetune" in args.protocol:
        if (args.train_fraction is None) == (args.subset_file is None):
            raise ValueError("--protocol finetune needs exactly one of --train_fraction (e.g. 0.01) and --subset_file")
        if args.train_fraction is not None and not 0 < args.train_fraction <= 1:
            raise ValueError(f"--train_fraction {args.train_fraction}: give a fraction in (0, 1]")
    if args.resume and not {"linear", "finetune"} & set(args.protocol):
        raise ValueError("--resume applies to --protocol linear and finetune only")
    if len(set(args.protocol)) != len(args.protocol):
        raise ValueError(f"--protocol {' '.join(args.protocol)}: each protocol once")
    intl.check_ranges(args, RANGES)
    if args.output_dir is None:
        args.output_dir = str(default_output_dir(args.backbone, args.revision))
    intl.check_output_dir(args.output_dir)
    return args


def default_output_dir(backbone, revision=None):
    """The results folder when --output_dir is not given: one per backbone, so that two backbones in one folder
    (two exports, two checkpoints, two .pth.tar files) never write into the same one."""
    path = Path(os.path.expanduser(backbone))
    if path.exists():
        path = path.resolve()
        if (path / "trainer_state.json").is_file():
            return path.parent.parent / "eval" / path.name  # OUTPUT_DIR/checkpoints/step-N -> OUTPUT_DIR/eval/step-N
        return path.parent / "eval" / path.name  # OUTPUT_DIR/backbone -> OUTPUT_DIR/eval/backbone
    name = backbone if revision is None else f"{backbone}@{revision}"
    return Path("runs") / "eval" / name.replace("/", "--").replace("@", "--")


def interrupted_message(protocol, output_dir):
    """The one line Ctrl-C prints during a trained protocol: the epoch it stopped in and how to continue."""
    saved = sorted((output_dir / "checkpoints" / protocol).glob("epoch-*/eval_state.json"))
    done = int(saved[-1].parent.name.split("-")[1]) if saved else 0
    if not done:
        return (f"interrupted in epoch 1 of {protocol}, before its first checkpoint: nothing to resume; run the "
                "command again")
    return f"interrupted in epoch {done + 1} of {protocol}; continue with --resume (from the end of epoch {done})"


def protocol_settings(protocol, args, recipe=None, **extra):
    """What a trained protocol computes with: the flags, or the protocol's defaults where they are None (the
    recipe's learning rates too, given the recipe from `evaluation_recipe`)."""
    defaults = dict(DEFAULTS[protocol])
    if recipe is not None:
        defaults.update(RECIPE_LRS[recipe["recipe"]].get(protocol, {}))
    settings = {key: getattr(args, key) if getattr(args, key) is not None else default
                for key, default in defaults.items()}
    if recipe is not None and protocol in RECIPE_LRS[recipe["recipe"]]:
        settings.update(recipe=recipe["recipe"], recipe_chosen_by=recipe["chosen_by"])
    if protocol == "linear-cached":
        settings["min_lr"] = args.min_lr
    if protocol == "linear":
        settings["milestones"] = args.milestones
    return {**settings, "seed": args.seed, **extra}


def evaluation_recipe(flag, backbone_config):
    """Which of the authors' evaluation recipes applies, 'intl' or 'intl-m', and what chose it.

    The linear head's and the fine-tuned backbone's learning rates differ between INTL and INTL-M (RECIPE_LRS).
    An export records its method (config.json: `method`, and `recipe.method`); an official .pth.tar records
    none, so --recipe says it. Neither: INTL's, and the returned reason says so (the run prints it).
    """
    recorded = backbone_config.get("method") or (backbone_config.get("recipe") or {}).get("method")
    if flag is not None:
        if recorded in RECIPE_LRS and recorded != flag:
            raise ValueError(f"--recipe {flag}, but the backbone records method {recorded!r}: leave --recipe out "
                             "(the recorded method decides); other learning rates are set with --lr / --lr_backbone")
        return {"recipe": flag, "chosen_by": f"--recipe {flag}"}
    if recorded in RECIPE_LRS:
        return {"recipe": recorded, "chosen_by": f"the backbone's recorded method {recorded!r}"}
    if recorded is not None:
        return {"recipe": "intl", "chosen_by": f"default (the backbone's method {recorded!r} is neither intl nor "
                                               "intl-m; --recipe chooses)"}
    return {"recipe": "intl", "chosen_by": "default (neither --recipe nor the backbone records a method; "
                                           "--recipe intl-m for an INTL-M backbone)"}


def recipe_lr_note(protocol, recipe, args):
    """One line saying which learning rates the protocol uses and what chose them."""
    settings = protocol_settings(protocol, args, recipe)
    flags = ("lr", "lr_backbone") if protocol == "finetune" else ("lr",)
    rates = ", ".join(f"{'head' if flag == 'lr' else 'backbone'} lr {settings[flag]:g}"
                      + (f" (--{flag})" if getattr(args, flag) is not None else "") for flag in flags)
    return (f"{protocol}: {rates} per 256 images of global batch; {RECIPE_NAMES[recipe['recipe']]}'s recipe, "
            f"chosen by {recipe['chosen_by']}")


def per_process_batch(global_batch, processes):
    """The share of the global batch of each process: the protocols' batch (256) is global, as in the authors' runs."""
    if global_batch % processes:
        raise ValueError(f"--batch_size {global_batch} is the global batch and must split evenly over the "
                         f"{processes} processes: give a multiple of {processes}, or run a number of processes "
                         f"that divides {global_batch}")
    return global_batch // processes


def split_used(split, asked):
    """The name of the split that was loaded ("validation" where "test" was asked for and only that exists)."""
    return str(split.dataset.split) if split.dataset.split is not None else asked


def load_labelled_splits(args, accelerator=None):
    splits = [intl.load_image_split(args.dataset, name, args.image_column, args.label_column, accelerator)
              for name in (args.train_split, args.test_split)]
    num_classes = 0
    for split in splits:
        if split.label_column is None:
            raise ValueError(f"{split.source} has no labels (no 'label' column or ClassLabel feature): the "
                             "evaluations need labelled training and test splits; name one with --label_column")
        labels = intl.labels_of(split)
        if len(labels) == 0:
            raise ValueError(f"{split.source} is empty")
        if labels.min() < 0:
            raise ValueError(f"{split.source} has {int((labels < 0).sum())} image(s) without a label")
        num_classes = max(num_classes, split.num_classes or 0, int(labels.max()) + 1)
    return splits[0], splits[1], num_classes


def loader_of(split, transform, batch_size, args, accelerator, sampler=None, drop_last=False):
    """A DataLoader prepared by Accelerate: sharded over processes, batches on the device."""
    loader = torch.utils.data.DataLoader(
        intl.ImageDataset(split, transform), batch_size=batch_size, sampler=sampler, num_workers=args.num_workers,
        pin_memory=accelerator.device.type == "cuda", drop_last=drop_last)
    return accelerator.prepare_data_loader(loader)


def extract(backbone, split, transform, name, args, accelerator):
    loader = loader_of(split, transform, args.eval_batch_size, args, accelerator)
    progress = tqdm(loader, desc=f"features ({name})", disable=not accelerator.is_main_process, leave=False)
    return intl.extract_features(backbone, progress, accelerator)


# -----------------------------------------------------------------------------
# knn and linear-cached: on the frozen features


def run_knn(features, args, device="cpu"):
    (train_f, train_l), (test_f, test_l) = features["train"], features["test"]
    rows = []
    for asked in args.k:
        k = min(asked, len(train_f))  # the row's name says which k was really used
        if args.knn_metric == "euclidean":
            top1 = intl.knn_classify(train_f, train_l, test_f, test_l, k=k, device=device)["top1"]
            rows.append({"name": f"{k}-NN (euclidean)", "top1": top1, "top5": None})
        else:
            result = weighted_cosine_knn(train_f, train_l, test_f, test_l, k, args.temperature)
            rows.append({"name": f"{k}-NN (cosine, T={args.temperature:g})", **result})
    settings = {"metric": args.knn_metric, "k": args.k}
    if args.knn_metric == "cosine":
        settings["temperature"] = args.temperature
    return {"rows": rows, "settings": settings, "n_evaluated": len(test_f)}


@torch.no_grad()
def weighted_cosine_knn(train_features, train_labels, test_features, test_labels, k, temperature, chunk=1024):
    """k-NN with cosine similarity, each neighbour voting exp(similarity / T) for its class: top-1 / top-5 (%)."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_n = F.normalize(train_features.float(), dim=1)
    hits1 = hits5 = 0
    for start in range(0, len(test_features), chunk):
        queries = F.normalize(test_features[start:start + chunk].float(), dim=1)
        similarity, nearest = (queries @ train_n.t()).topk(k, dim=1)
        votes = torch.zeros(len(queries), num_classes)
        votes.scatter_add_(1, train_labels[nearest], (similarity / temperature).exp())
        top1, top5 = count_hits(votes.topk(min(5, num_classes), dim=1).indices, test_labels[start:start + chunk])
        hits1, hits5 = hits1 + top1, hits5 + top5
    return {"top1": 100.0 * hits1 / len(test_features), "top5": 100.0 * hits5 / len(test_features)}


def run_linear_cached(features, num_classes, args, accelerator):
    """Adam on the cached features: every process trains the same head on all of them (they are gathered)."""
    settings = protocol_settings("linear-cached", args)
    device = accelerator.device
    (train_f, train_l), (test_f, test_l) = [(f.to(device), l.to(device)) for f, l in (features["train"],
                                                                                      features["test"])]
    set_seed(args.seed)
    head = nn.Linear(train_f.shape[1], num_classes).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    epochs = settings["epochs"]
    order = torch.Generator().manual_seed(args.seed)
    history = []
    for epoch in tqdm(range(epochs), desc="linear-cached", disable=not accelerator.is_main_process, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = cached_lr(epoch, epochs, settings["lr"], settings["min_lr"])
        head.train()
        for batch in torch.randperm(len(train_f), generator=order).split(settings["batch_size"]):
            batch = batch.to(device)
            loss = F.cross_entropy(head(train_f[batch]), train_l[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        head.eval()
        with torch.no_grad():
            history.append({"epoch": epoch + 1, **topk_accuracy(head(test_f), test_l)})
    return {**trained_record("linear on cached features", settings, history), "n_evaluated": len(test_f)}


def cached_lr(epoch, epochs, lr, min_lr):
    """Exponential decay from lr (first epoch) to min_lr (last epoch)."""
    return lr * (min_lr / lr) ** (epoch / max(1, epochs - 1))


def topk_accuracy(logits, labels):
    top1, top5 = count_hits(logits.topk(min(5, logits.shape[1]), dim=1).indices, labels)
    return {"top1": 100.0 * top1 / len(labels), "top5": 100.0 * top5 / len(labels)}


def count_hits(ranked, labels):
    """The five best classes of each image, best first [N, <=5], and the labels [N] -> (top-1 hits, top-5 hits)."""
    hit = ranked == labels[:, None]
    return hit[:, 0].sum().item(), hit.any(dim=1).sum().item()


def trained_record(name, settings, history):
    """The final epoch is the result; the best epoch is kept as a labelled extra (it peeks at the test split)."""
    final = history[-1]
    best = max(history, key=lambda h: (h["top1"], h["epoch"]))
    return {"rows": [{"name": name, "top1": final["top1"], "top5": final["top5"]}],
            "final_epoch": final["epoch"],
            "best_epoch_extra": {"epoch": best["epoch"], "top1": best["top1"], "top5": best["top5"],
                                 "note": "chosen on the test split: not the reported result"},
            "settings": settings, "history": history}


# -----------------------------------------------------------------------------
# linear (ImageNet protocol) and finetune: trained on images


class Classifier(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images):
        return self.head(self.backbone(images))


class EpochSampler(torch.utils.data.Sampler):
    """One permutation per epoch from (seed, epoch): the same on every process, replayed by a resumed run."""

    def __init__(self, num_samples, seed):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        return iter(intl.epoch_order(self.num_samples, self.seed, self.epoch).tolist())


def run_trained_protocol(protocol, backbone, splits, args, accelerator, recipe):
    """linear or finetune: SGD on the (augmented) training split, evaluated on the test split, checkpointed every
    epoch. splits: (train, test, number of classes). -> the protocol's record, or None after --stop_after_epochs."""
    train_split, test_split, num_classes = splits
    image_size, mean, std, output_dir = args.image_size, args.mean, args.std, Path(args.output_dir)
    say = tqdm.write if accelerator.is_main_process else (lambda *_: None)
    finetune = protocol == "finetune"
    if finetune:
        train_split = training_subset(train_split, num_classes, args)
        say(f"finetune on {len(train_split.dataset)} training images"
            + (f" ({RANDOM_SUBSET_NOTE})" if args.train_fraction is not None else ""))
        backbone = copy.deepcopy(backbone).requires_grad_(True)  # the other protocols keep the pretrained one
    settings = protocol_settings(protocol, args, recipe, batch_size_is="global", image_size=image_size,
                                 processes=accelerator.num_processes, n_train=len(train_split.dataset),
                                 train_fraction=args.train_fraction if finetune else None,
                                 subset_file=args.subset_file if finetune else None)
    epochs = settings["epochs"]

    set_seed(args.seed)
    head = nn.Linear(backbone.feature_dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    global_batch = settings["batch_size"]
    batch_per_process = per_process_batch(global_batch, accelerator.num_processes)
    scale = global_batch / 256
    groups = [{"params": list(head.parameters()), "base_lr": settings["lr"] * scale}]
    if finetune:
        model = intl.sync_batchnorm(Classifier(backbone, head), accelerator)
        groups.append({"params": list(model.backbone.parameters()), "base_lr": settings["lr_backbone"] * scale})
    else:
        model = head
        reference = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        freeze(backbone)
    optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9, weight_decay=settings["weight_decay"])

    sampler = EpochSampler(len(train_split.dataset), args.seed)
    train_loader = torch.utils.data.DataLoader(
        intl.ImageDataset(train_split, train_transform(image_size, mean, std)), batch_size=batch_per_process,
        sampler=sampler,
        num_workers=args.num_workers, pin_memory=accelerator.device.type == "cuda",
        drop_last=len(train_split.dataset) >= global_batch)
    test_loader = torch.utils.data.DataLoader(
        intl.ImageDataset(test_split, intl.eval_transform(image_size, mean, std)),
        batch_size=args.eval_batch_size, num_workers=args.num_workers)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    steps_per_epoch = len(train_loader)

    checkpoints = output_dir / "checkpoints" / protocol
    if accelerator.is_main_process:
        for name in intl.remove_interrupted_saves(checkpoints):
            say(f"removed {checkpoints / name}, left by an interrupted save")
    start_epoch, history = 0, []
    if args.resume:
        start_epoch, history = resume(checkpoints, settings, accelerator)
        say(f"{protocol}: resumed after epoch {start_epoch}")
    elif accelerator.is_main_process and checkpoints.exists():
        shutil.rmtree(checkpoints)  # a new run: an old run's checkpoints would be resumed by mistake

    if finetune:
        def forward(images):
            return model(images)
    else:
        def forward(images):
            with torch.no_grad():
                features = backbone(images)
            return model(features.float())

    progress = tqdm(total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch, desc=protocol,
                    disable=not accelerator.is_main_process, leave=False)
    for epoch in range(start_epoch, epochs):
        train_loader.set_epoch(epoch)  # Accelerate passes it on to the sampler at every iteration
        model.train()
        if not finetune:
            freeze(backbone)
        loss_sum = torch.zeros((), device=accelerator.device)
        for step, (images, labels) in enumerate(train_loader):
            factor = lr_factor(protocol, epoch + step / steps_per_epoch, epochs, settings.get("milestones"))
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            with accelerator.autocast():
                loss = F.cross_entropy(forward(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            loss_sum += loss.detach()
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
        entry = {"epoch": epoch + 1, "train_loss": accelerator.reduce(loss_sum / steps_per_epoch, "mean").item(),
                 "lr_head": optimizer.param_groups[0]["lr"]}
        if finetune:
            entry["lr_backbone"] = optimizer.param_groups[1]["lr"]
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == epochs:
            model.eval()
            entry.update(evaluate(forward, test_loader, accelerator, num_classes))
        history.append(entry)
        save_epoch(checkpoints, epoch + 1, settings, history, accelerator)
        if args.stop_after_epochs is not None and epoch + 1 >= args.stop_after_epochs and epoch + 1 < epochs:
            progress.close()
            say(f"{protocol}: stopped after epoch {epoch + 1} of {epochs}; continue with --resume")
            return None
    progress.close()

    name = "linear (ImageNet protocol)"
    if finetune:
        name = f"fine-tune on {len(train_split.dataset)} images"
        if args.train_fraction is not None:
            name += f" (random {args.train_fraction:g}: not comparable to the paper)"
    record = trained_record(name, settings, [h for h in history if "top1" in h])
    if finetune:
        record["comparable_to_paper"] = args.train_fraction is None
        if args.train_fraction is not None:
            record["note"] = RANDOM_SUBSET_NOTE
    else:
        record["backbone_unchanged"] = check_backbone_unchanged(backbone, reference)
    return record


RANDOM_SUBSET_NOTE = ("a random --train_fraction subset, not the standard 1% / 10% image lists (--subset_file): "
                      "not comparable to the papers' semi-supervised numbers")


def train_transform(image_size, mean, std):
    """The training input of linear and finetune: RandomResizedCrop + flip, resized bilinearly (torchvision's
    default, as in the authors' runs)."""
    return T.Compose([
        T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.RandomHorizontalFlip(),
        T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def freeze(backbone):
    """The linear protocol's backbone: no gradients, BN in eval mode (running statistics are not updated)."""
    backbone.requires_grad_(False)
    backbone.eval()


class BackboneChanged(RuntimeError):
    pass


def check_backbone_unchanged(backbone, reference):
    """Every weight and buffer (BN running statistics included) bit-identical to before training."""
    for key, value in backbone.state_dict().items():
        if not torch.equal(value.detach().cpu(), reference[key].cpu()):
            raise BackboneChanged(f"the frozen backbone changed during linear evaluation ({key!r} differs): "
                                  "the result is not a linear evaluation of the pretrained weights")
    return True


def lr_factor(protocol, epoch, epochs, milestones):
    """linear: x0.1 after each milestone (fractions of the epochs; epoch may be fractional). finetune: constant, as
    in the authors' runs, whose step milestones (epochs 60 and 80) lie beyond its 20 epochs."""
    if protocol == "linear":
        return 0.1 ** sum(int(epoch) >= round(m * epochs) for m in milestones)
    return 1.0


@torch.no_grad()
def evaluate(forward, loader, accelerator, num_classes):
    """Top-1 / top-5 (%) over every test image exactly once (gather_for_metrics drops the padded tail)."""
    hits1 = hits5 = count = 0
    for images, labels in loader:
        with accelerator.autocast():
            logits = forward(images)
        ranked = logits.float().topk(min(5, num_classes), dim=1).indices
        ranked, labels = accelerator.gather_for_metrics((ranked.contiguous(), labels))
        top1, top5 = count_hits(ranked, labels)
        hits1, hits5, count = hits1 + top1, hits5 + top5, count + len(labels)
    return {"top1": 100.0 * hits1 / count, "top5": 100.0 * hits5 / count, "n_evaluated": count}


def training_subset(split, num_classes, args):
    """The images finetune learns from: the names in --subset_file, or a seeded class-balanced fraction."""
    if args.subset_file:
        names = [line.strip() for line in Path(args.subset_file).read_text().splitlines() if line.strip()]
        if not names:
            raise ValueError(f"--subset_file {args.subset_file} lists no image names")
        files = image_file_names(split)
        wanted = set(names)
        indices = [i for i, name in enumerate(files) if name in wanted]
        found = {files[i] for i in indices}
        absent = [n for n in names if n not in found]
        if absent:
            raise ValueError(f"--subset_file: {len(absent)} of its {len(names)} images are not in {split.source} "
                             f"(first {absent[0]!r})")
    else:
        labels = intl.labels_of(split)
        generator = torch.Generator().manual_seed(args.seed)
        indices = []
        for c in range(num_classes):
            members = (labels == c).nonzero().flatten()
            if len(members):
                take = max(1, round(args.train_fraction * len(members)))
                indices += members[torch.randperm(len(members), generator=generator)[:take]].tolist()
        indices.sort()
    return replace(split, dataset=split.dataset.select(indices))


def image_file_names(split):
    """The file name (no folder) of every image of the split, from its stored path, without decoding."""
    column = split.dataset.with_format("arrow")[split.image_column]
    paths = [p for chunk in column.chunks for p in chunk.field("path").to_pylist()]
    if any(p is None for p in paths):
        raise ValueError(f"{split.source} stores images without file names, so --subset_file cannot select them; "
                         "use --train_fraction")
    return [os.path.basename(p) for p in paths]


# -----------------------------------------------------------------------------
# Checkpoints of linear and finetune: one per epoch, the last kept


def save_epoch(root, epoch, settings, history, accelerator):
    intl.save_state_atomically(accelerator, root / f"epoch-{epoch:04d}", "eval_state.json",
                               {"epoch": epoch, "settings": settings, "history": history}, keep=1)


def resume(root, settings, accelerator):
    done = sorted(root.glob("epoch-*/eval_state.json"))
    if not done:
        raise ValueError(f"--resume: no checkpoint in {root}; start without --resume")
    state = intl.read_json(done[-1])
    saved = state.get("settings") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or not isinstance(state.get("epoch"), int) or not isinstance(state.get("history"), list):
        raise ValueError(f"--resume: {done[-1]} lacks the epoch, settings or history of the evaluation: the file is "
                         "damaged; start again without --resume (and with --overwrite)")
    changed = intl.changed_settings(saved, settings)
    if changed:
        raise ValueError(f"--resume: {changed[0]} is {settings[changed[0]]!r} now but {saved.get(changed[0])!r} in "
                         f"{done[-1].parent}; a resumed evaluation keeps its settings")
    try:
        intl.load_state(accelerator, done[-1].parent, "eval_state.json")
    except ValueError as error:
        raise ValueError(f"--resume: {done[-1].parent}: {error}; start again without --resume (and with "
                         "--overwrite)") from None
    return state["epoch"], state["history"]


# -----------------------------------------------------------------------------
# Benchmark of the 5-NN at ImageNet size


def benchmark_knn(n_train, n_test, dim, k=5):
    """Seconds and peak memory of intl.knn_classify on random features, on the GPU if there is one.

    The features are filled in place (no temporary the size of the set), so the peak is the features plus what
    the kNN itself holds. GPU: peak allocated on the device (the features stay on the CPU and go over in blocks);
    CPU: peak resident set of the process during the kNN (Linux's VmHWM, reset before it), features included.

    Measured on 2 CPU cores shared with other jobs (float32, k = 5): 1,281,167 training x 2,000 test
    features of width 2048 took 237 s with a peak resident set of 10.9 GiB, of which the features are
    9.8 GiB and the kNN's own blocks 0.39 GiB. Time grows linearly with the test set, so the full
    50,000 ImageNet validation images would take about 25 x 237 s, some 1.6 h, on that CPU in the
    same memory (no GPU was available to measure). At 128,000 x 2,000 the previous float64
    implementation needed 4.9 GiB beyond the features and 52 s, against 0.39 GiB and 24 s now; at
    ImageNet size its float64 copy of the training set alone would be 19.5 GiB.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(0)
    train, test = torch.empty(n_train, dim), torch.empty(n_test, dim)
    for features in (train, test):
        for start in range(0, len(features), 65536):
            features[start:start + 65536].uniform_(generator=generator)  # non-negative, like ReLU features
    train_labels = torch.randint(0, 1000, (n_train,), generator=generator)
    test_labels = torch.randint(0, 1000, (n_test,), generator=generator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_resident_set()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else resident_set("VmRSS")
    tic = time.perf_counter()
    intl.knn_classify(train, train_labels, test, test_labels, k=k, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resident_set("VmHWM")
    return {"n_train": n_train, "n_test": n_test, "dim": dim, "k": k, "device": str(device),
            "cpu_threads": torch.get_num_threads(), "seconds": round(seconds, 4),
            "features_gib": round((train.nbytes + test.nbytes) / 2**30, 3),
            "peak_memory_gib": round(peak / 2**30, 3), "knn_own_memory_gib": round((peak - before) / 2**30, 3),
            "peak_memory_is": "GPU peak allocated (the features stay on the CPU)" if device.type == "cuda" else
                              "peak resident set of the process (features and Python included); "
                              "knn_own_memory_gib: that peak minus the resident set just before the kNN"}


def reset_peak_resident_set():
    """Linux: writing 5 to /proc/self/clear_refs resets the process's peak resident set (VmHWM)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def resident_set(field):
    """Bytes of /proc/self/status's field (VmRSS: now; VmHWM: the peak), Linux; elsewhere the lifetime peak."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


# -----------------------------------------------------------------------------
# Report


def results_table(records, data, output_dir):
    width = max([44] + [len(row["name"]) for record in records for row in record["rows"]])
    lines = [f"results on {data['dataset']} ({data['test_split']}: {data['n_test']} images; "
             f"{data['train_split']}: {data['n_train']} images), final epoch:",
             f"  {'protocol':{width}s} {'top-1':>7s} {'top-5':>7s}"]
    extras = []
    for record in records:
        for row in record["rows"]:
            top5 = "-" if row["top5"] is None else f"{row['top5']:7.2f}"
            lines.append(f"  {row['name']:{width}s} {row['top1']:7.2f} {top5:>7s}")
        if "note" in record:
            extras.append(f"  {record['protocol']}: {record['note']}")
        if "best_epoch_extra" in record:
            best = record["best_epoch_extra"]
            extras.append(f"  extra, not the result: best epoch of {record['protocol']} was {best['epoch']} "
                          f"(top-1 {best['top1']:.2f})")
        if record.get("backbone_unchanged"):
            extras.append("  linear: every backbone weight and BN buffer is bit-identical after training")
    files = ", ".join(str(output_dir / f"{r['protocol']}.json") for r in records)
    return "\n".join(lines + extras + [f"written to {files}"])


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, BackboneChanged) as error:
        sys.exit(f"error: {error}")
    except intl.UnreadableImageError as error:
        sys.exit(f"error: {error.one_line()}")
    except KeyboardInterrupt as interrupt:  # Ctrl-C: one line, exit status 130
        intl.exit_interrupted(interrupt, "interrupted (knn and linear-cached keep no checkpoints: run the command "
                                         "again)")
