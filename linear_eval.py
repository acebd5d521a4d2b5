"""Evaluate a pretrained backbone by the papers' protocols, with Hugging Face Accelerate.

    python linear_eval.py --backbone runs/digits/backbone            # offline: 5-NN + linear on cached features
    accelerate launch linear_eval.py --backbone runs/in1k/backbone --protocol linear \\
        --dataset ILSVRC/imagenet-1k --test_split validation
    python linear_eval.py export --source intl_800ep.pth.tar --output_dir intl_800ep --arch resnet50  # once
    accelerate launch linear_eval.py --backbone intl_800ep --recipe intl --protocol finetune \\
        --subset_file 1percent.txt --dataset /data/imagenet

Protocols (the papers'; the defaults of the flags left at None). Batches are global, SGD learning rates per 256 images
of it; no protocol drops a last partial batch; all test on Resize + CenterCrop.
    knn            k-NN on frozen features: k = 5, Euclidean, one vote each, a tie to the smallest class id
    linear-cached  a linear head on features extracted once without augmentation: Adam, lr 1e-2, wd 5e-6, batch
                   1000, 500 epochs; ExponentialLR per epoch, gamma = (1e-4) ** (1 / 500)
    linear         the ImageNet protocol: frozen backbone in eval mode, fc from N(0, 0.01), SGD momentum 0.9 without
                   wd, 100 epochs, bilinear RandomResizedCrop + flip; afterwards a check that no backbone weight or
                   BN buffer changed. INTL / INTL-M: batch 256, lr 0.2 / 0.4, x0.1 at 60 and 80. CW-RGP: LARC
                   (trust 0.001, no clipping) around the SGD, batch 1024, lr 0.1, cosine per epoch
    finetune       all layers, 20 epochs at a constant lr (head 0.2, backbone 0.006 INTL / 0.004 INTL-M; CW-RGP has
                   none: --lr_backbone), batch 256, plain BatchNorm per process, on the images named in
                   --subset_file (the standard 1% / 10% lists)

The result is the final epoch's top-1 / top-5 (top-5 with more than 5 classes; the best epoch is a labelled extra),
written to OUTPUT_DIR/<protocol>.json; linear and finetune save a checkpoint every epoch.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import time
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torchvision.transforms import v2 as T
from tqdm.auto import tqdm

import intl

PROTOCOLS = ("knn", "linear-cached", "linear", "finetune")
TRAINED = ("linear", "finetune")  # trained on images, with a checkpoint every epoch
# The defaults of the flags left at None, per protocol (the docstring's table).
DEFAULTS = {
    "linear-cached": dict(epochs=500, batch_size=1000, lr=1e-2, weight_decay=5e-6, min_lr=1e-6),
    "linear": dict(epochs=100, batch_size=256, weight_decay=0.0, schedule="step", larc_trust=None),
    "finetune": dict(epochs=20, batch_size=256, lr=0.2, lr_backbone=None, weight_decay=0.0, schedule="constant"),
}
# The authors' settings that depend on the backbone's pretraining method (--recipe; the docstring's table).
RECIPES = {
    "intl": {"linear": {"lr": 0.2}, "finetune": {"lr_backbone": 0.006}},
    "intl-m": {"linear": {"lr": 0.4}, "finetune": {"lr_backbone": 0.004}},
    "cw-rgp": {"linear": {"lr": 0.1, "batch_size": 1024, "schedule": "cosine", "larc_trust": 0.001}},
}
# The valid range of every numeric flag (intl.check_settings), checked before any work.
RANGES = {"image_size": "[1, inf)", "mean": "(-inf, inf)", "std": "(0, inf)", "num_workers": "[0, inf)",
          "eval_batch_size": "[1, inf)", "k": "[1, inf)", "seed": "[0, 4294967295]", "epochs": "[1, inf)",
          "batch_size": "[1, inf)", "lr": "(0, inf)", "lr_backbone": "[0, inf)", "min_lr": "[0, inf)",
          "weight_decay": "[0, inf)", "milestones": "[0, 1]", "stop_after_epochs": "[1, inf)"}


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False, formatter_class=intl.HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="Hub dataset id, a folder of class sub-folders, a save_to_disk folder, or "
                      "'digits'; None: the dataset the backbone's config.json names, if it is not a local folder")
    data.add_argument("--train_split", default="train", help="labelled split the classifiers learn from")
    data.add_argument("--test_split", default="test", help="labelled split to test on (ImageNet-1k: validation)")
    data.add_argument("--image_column", help="image column; None: detected")
    data.add_argument("--label_column", help="label column; None: detected")
    data.add_argument("--image_size", type=int, help="input side in pixels; None: the backbone's pretraining size")
    data.add_argument("--mean", type=float, nargs=3, help="normalisation mean; None: the backbone's")
    data.add_argument("--std", type=float, nargs=3, help="normalisation std; None: the backbone's")
    data.add_argument("--num_workers", type=int, default=2, help="data loader processes per evaluation process")
    data.add_argument("--eval_batch_size", type=int, default=256, help="batch per process for features and tests")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", required=True, help="export folder, Hub repo id 'owner/name' or pretrain "
                       "checkpoint folder (an official .pth.tar: `linear_eval.py export` it first)")
    model.add_argument("--revision", help="Hub branch, tag or commit of --backbone")
    model.add_argument("--recipe", choices=sorted(RECIPES), help="the backbone's pretraining method, which picks the "
                       "authors' settings (table above); None: its config.json's, else INTL's")

    protocol = parser.add_argument_group("evaluation protocol")
    protocol.add_argument("--protocol", nargs="+", default=["knn", "linear-cached"], choices=PROTOCOLS,
                          help="one or more evaluations; knn and linear-cached share one feature extraction")
    protocol.add_argument("--k", type=int, nargs="+", default=[5], help="knn: numbers of neighbours")
    protocol.add_argument("--subset_file", help="finetune: image file names, one a line (class/file: a repeated name)")

    optim = parser.add_argument_group("optimisation (None: the protocol's, table above)")
    optim.add_argument("--epochs", type=int, help="training epochs")
    optim.add_argument("--batch_size", type=int, help="GLOBAL training batch, all processes together: divisible by "
                       "their number")
    optim.add_argument("--lr", type=float, help="head learning rate")
    optim.add_argument("--lr_backbone", type=float, help="finetune: backbone learning rate")
    optim.add_argument("--min_lr", type=float, help="linear-cached: the lr after --epochs epochs (ExponentialLR)")
    optim.add_argument("--weight_decay", type=float)
    optim.add_argument("--milestones", type=float, nargs="+", default=[0.6, 0.8],
                       help="linear: lr x0.1 after these fractions of --epochs")

    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=0, help="seed of the head's init and the data order")
    run.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="None: Accelerate's config")
    run.add_argument("--output_dir", type=intl.folder, help="None: eval/<name> next to a local backbone (a "
                     "checkpoint's: OUTPUT_DIR/eval/step-N), runs/eval/<repo> for a Hub id")
    run.add_argument("--overwrite", action="store_true", help="replace an earlier run's results of these protocols")
    run.add_argument("--resume", type=intl.folder, help="linear, finetune: 'latest' (the newest checkpoint of each in "
                     "OUTPUT_DIR/checkpoints/<protocol>/) or a checkpoint folder there, with the same backbone")
    run.add_argument("--stop_after_epochs", type=int, help="linear, finetune: save and stop after this many epochs "
                     "(the schedule still spans --epochs); continue with --resume latest")
    run.add_argument("--print_config", action="store_true", help="print the configuration completed by the backbone")
    return parser


def main(argv=None):
    """Configuration, then the evaluation in its locked output folder."""
    config = resolve_args(argv)
    if config.print_config:
        _, backbone_config = intl.load_backbone(config.backbone, config.revision)
        return print(json.dumps(vars(completed_by_backbone(config, backbone_config)), indent=2))
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    with intl.locked(config.output_dir, accelerator.is_main_process):
        evaluate_backbone(config, accelerator)


def evaluate_backbone(config, accelerator):
    """Backbone (a wrong one fails before anything is removed) -> data -> each protocol -> results."""
    resumed = checkpoints_to_resume(config)  # a resumed evaluation continues the results in output_dir: its own
    backbone, backbone_config = intl.load_backbone(config.backbone, config.revision)
    config = completed_by_backbone(config, backbone_config)
    output_dir = Path(config.output_dir)
    trained = [p for p in config.protocol if p in TRAINED]
    accelerator.print(f"{accelerator.num_processes} process(es) on {accelerator.device}; backbone {config.backbone}: "
                      f"{config.arch}, {backbone.feature_dim}-d features, input {config.image_size} px")
    for protocol in trained:  # a global batch that does not split over the processes is refused before any work
        settings = protocol_settings(protocol, config)
        intl.per_process_batch(settings["batch_size"], accelerator.num_processes)
        rates = [f"{part} lr {settings[flag]:g}" + f" (--{flag})" * (getattr(config, flag) is not None)
                 for part, flag in (("head", "lr"), ("backbone", "lr_backbone")) if flag in settings]
        accelerator.print(f"{protocol}: {', '.join(rates)} per 256 images of global batch; "
                          f"{config.recipe.upper()}'s recipe, chosen by {config.recipe_chosen_by}")
    intl.clear_earlier_run(output_dir, [f"{p}.json" for p in config.protocol] + [f"checkpoints/{p}" for p in trained],
                           config.overwrite, next(filter(None, resumed.values()), None), accelerator.print,
                           accelerator.is_main_process)
    freeze(backbone.to(accelerator.device))
    config.backbone_id = checked_backbone(resumed, config.backbone, backbone)
    splits, data = load_labelled_splits(config, accelerator)

    if {"knn", "linear-cached"} & set(config.protocol):
        features = frozen_features(backbone, splits, config, accelerator)
    for protocol in config.protocol:  # each written to its own results file and printed as soon as it is done
        tic = time.time()
        if protocol == "knn":
            record = run_knn(features, config, accelerator.device)
        elif protocol == "linear-cached":
            record = run_linear_cached(features, splits.num_classes, config, accelerator)
        else:
            record = run_trained_protocol(protocol, resumed[protocol], config, backbone, splits, accelerator)
            if record is None:  # --stop_after_epochs
                return
        record = {"protocol": protocol, **record, "backbone": config.backbone, "arch": config.arch,
                  "image_size": config.image_size, **data, "processes": accelerator.num_processes,
                  "seconds": round(time.time() - tic, 2)}
        if accelerator.is_main_process:
            intl.write_text_atomically(output_dir / f"{protocol}.json", json.dumps(record, indent=2) + "\n")
        for row in record["rows"]:
            top5 = "" if row["top5"] is None else f", top-5 {row['top5']:.2f}"
            when = ", final epoch" if "final_epoch" in record else ""
            accelerator.print(f"{row['name']} on {data['dataset']} ({data['n_test']} {data['test_split']} images)"
                              f"{when}: top-1 {row['top1']:.2f}{top5} -> {output_dir / protocol}.json")
    accelerator.end_training()


# ----------------------------------------------------------------------------- configuration


def resolve_args(argv=None):
    """The flags, with the defaults that follow from other flags, checked before any work."""
    parser = get_parser()
    config = parser.parse_args(argv)
    config.protocol = list(dict.fromkeys(config.protocol))  # a protocol named twice runs once
    if config.output_dir is None:
        config.output_dir = str(default_output_dir(config.backbone, config.revision))
    if "finetune" in config.protocol and config.subset_file is None:
        raise ValueError("--protocol finetune needs --subset_file: the papers' standard 1% / 10% image lists")
    if config.resume and not set(TRAINED) & set(config.protocol):
        raise ValueError("--resume applies to --protocol linear and finetune only")
    intl.check_settings(vars(config), parser, RANGES)
    return config


def default_output_dir(backbone, revision=None):
    """--output_dir's default: one folder per backbone, also for two backbones side by side."""
    path = Path(os.path.expanduser(backbone)).resolve()
    if not path.exists():  # a Hub id
        return Path("runs") / "eval" / (backbone.replace("/", "--") + (f"--{revision}" if revision else ""))
    run = path.parent.parent if (path / "trainer_state.json").is_file() else path.parent  # of .../checkpoints/step-N
    return run / "eval" / path.name


def completed_by_backbone(config, backbone_config):
    """A copy of the configuration completed by the backbone: architecture, input size, normalisation, dataset (the
    pretraining data where config.json names one this command can load again) and recipe."""
    recipe, chosen_by = evaluation_recipe(config.recipe, backbone_config)
    dataset = config.dataset or backbone_config.get("dataset")
    if not config.dataset and (not dataset or backbone_config.get("dataset_is_local_folder")):
        where = f"a local folder, {dataset!r}," if dataset else "nothing"
        raise ValueError(f"--dataset is needed: {config.backbone} names {where} as its pretraining data; give the "
                         "labelled dataset to evaluate on")
    return argparse.Namespace(**{
        **vars(config), "dataset": dataset, "arch": backbone_config["arch"],  # arch: also where the weights say it
        "image_size": config.image_size or backbone_config["image_size"],
        "mean": config.mean or backbone_config["mean"], "std": config.std or backbone_config["std"],
        # CW-RGP's STL-10: Resize(70, bicubic) before the crop to 64
        "eval_resize": None if config.image_size else backbone_config.get("eval_resize"),
        "eval_interpolation": backbone_config.get("eval_interpolation", "bilinear"),
        "recipe": recipe, "recipe_chosen_by": chosen_by})


def evaluation_recipe(flag, backbone_config):
    """-> (the authors' evaluation recipe, 'intl', 'intl-m' or 'cw-rgp'; what chose it): --recipe, else the method."""
    recorded = backbone_config.get("method") or (backbone_config.get("recipe") or {}).get("method")
    if flag is not None:
        if recorded in RECIPES and recorded != flag:
            raise ValueError(f"--recipe {flag}, but the backbone records method {recorded!r}: leave --recipe out "
                             "(the recorded method decides); other learning rates are set with --lr / --lr_backbone")
        return flag, f"--recipe {flag}"
    if recorded in RECIPES:
        return recorded, f"the backbone's recorded method {recorded!r}"
    return "intl", "default (neither --recipe nor the backbone records a method: intl, intl-m or cw-rgp)"


def protocol_settings(protocol, config):
    """What a training protocol computes with: each flag, or where it is None the protocol's default."""
    defaults = {**DEFAULTS[protocol], **RECIPES.get(config.recipe, {}).get(protocol, {})}
    settings = {key: default if getattr(config, key, None) is None else getattr(config, key)
                for key, default in defaults.items()}
    if protocol == "finetune" and settings["lr_backbone"] is None:
        raise ValueError(f"--protocol finetune: {config.recipe.upper()}'s authors publish no fine-tuning learning "
                         "rate: give --lr_backbone")
    if protocol in TRAINED:
        settings.update(recipe=config.recipe, recipe_chosen_by=config.recipe_chosen_by)
    if settings.get("schedule") == "step":
        settings["milestones"] = config.milestones
    return {**settings, "seed": config.seed}


# ----------------------------------------------------------------------------- data


def load_labelled_splits(config, accelerator):
    """-> (.train, .test and .num_classes, of both splits together: a class may be missing from the test split;
    what the results say of the data)."""
    if config.train_split == config.test_split:
        raise ValueError(f"--train_split and --test_split are both {config.test_split}: it would test on the training "
                         "images; give a held-out --test_split")
    splits = [intl.load_image_split(config.dataset, name, config.image_column, config.label_column, accelerator)
              for name in (config.train_split, config.test_split)]
    num_classes = 0
    for split in splits:
        if split.label_column is None:
            raise ValueError(f"{split.source} has no integer class labels (no label column, or its labels are not "
                             "integer class indices): linear evaluation needs labelled training and test splits; "
                             "name the column with --label_column (Dataset.class_encode_column maps strings)")
        labels = labels_of(split)
        if len(labels) == 0 or labels.min() < 0:
            raise ValueError(f"{split.source} needs labelled images: it has {len(labels)}, {int((labels < 0).sum())} "
                             "without a label")
        num_classes = max(num_classes, split.num_classes or 0, int(labels.max()) + 1)
    if unseen := sorted(set(labels_of(splits[1]).tolist()) - set(labels_of(splits[0]).tolist())):
        raise ValueError(f"{splits[1].source} has {len(unseen)} class(es) that {splits[0].source} never has (first "
                         f"{unseen[0]}): no classifier learns them; test on the classes of the training split")
    data = dict(dataset=config.dataset, train_split=config.train_split, test_split=config.test_split,
                n_train=len(splits[0].dataset), n_test=len(splits[1].dataset), num_classes=num_classes)
    accelerator.print(f"{config.dataset}: {data['n_train']} training and {data['n_test']} test images, {num_classes} "
                      "classes")
    return SimpleNamespace(train=splits[0], test=splits[1], num_classes=num_classes), data


def labels_of(split):
    """All labels of `split` as a LongTensor [N] (-1 if unlabelled), without decoding any image."""
    if split.label_column is None:
        return torch.full((len(split.dataset),), -1, dtype=torch.long)
    column = split.dataset.with_format("arrow")[split.label_column]  # honours select() / shuffle() indices
    return torch.from_numpy(column.fill_null(-1).to_numpy().astype(np.int64))


def image_loader(split, config, accelerator, global_batch=None):
    """Test batches (per process) of eval_images; with global_batch, linear's and finetune's training batches:
    augmented, one order per epoch, the last partial batch kept (as the authors' runs do)."""
    if global_batch is None:
        dataset, options = intl.ImageDataset(split, eval_images(config)), dict(batch_size=config.eval_batch_size)
    else:
        dataset = intl.ImageDataset(split, train_transform(config.image_size, config.mean, config.std))
        options = dict(batch_size=intl.per_process_batch(global_batch, accelerator.num_processes),
                       sampler=EpochSampler(len(split.dataset), config.seed))
    return torch.utils.data.DataLoader(dataset, num_workers=config.num_workers,
                                       pin_memory=accelerator.device.type == "cuda", **options)


def eval_images(config):
    """Every protocol's test input: the backbone's evaluation resize (CW-RGP STL-10: 70 for 64 px) + centre crop."""
    return intl.eval_transform(config.image_size, config.mean, config.std, config.eval_resize,
                               config.eval_interpolation)


def train_transform(image_size, mean, std):
    """linear's and finetune's training input: RandomResizedCrop (bilinear, as in the authors' runs) + flip."""
    return T.Compose([
        T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
        T.RandomHorizontalFlip(),
        T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])


def training_subset(split, subset_file):
    """The images finetune learns from: those named in --subset_file, each a file name or, with a "/", the last parts
    of its path (class/file); a name of several images is refused."""
    names = [line.strip() for line in Path(subset_file).read_text().splitlines() if line.strip()]  # OSError: no file
    if not names:
        raise ValueError(f"--subset_file {subset_file} lists no image names")
    column = split.dataset.with_format("arrow")[split.image_column]  # the stored paths, no image decoded
    paths = [p for chunk in column.chunks for p in chunk.field("path").to_pylist()]
    if None in paths:
        raise ValueError(f"{split.source} stores images without file names, so --subset_file cannot select them")
    found = {}  # the last 1, 2, ... parts of each stored path, as the names are written -> the images they name
    for depth in {name.count("/") + 1 for name in names}:
        for i, path in enumerate(paths):
            found.setdefault("/".join(Path(path).parts[-depth:]), []).append(i)
    if absent := [name for name in names if name not in found]:
        raise ValueError(f"--subset_file: {len(absent)} of its {len(names)} images are not in {split.source} "
                         f"(first {absent[0]!r})")
    if ambiguous := next((name for name in names if len(found[name]) > 1), None):
        raise ValueError(f"--subset_file: {ambiguous!r} names {len(found[ambiguous])} images of {split.source}: "
                         "write it with its class folder (class/file)")
    return replace(split, dataset=split.dataset.select(sorted({found[name][0] for name in names})))


# ----------------------------------------------------------------------------- accuracy


def top5_correct(scores, labels):
    """Class scores [N, C] and labels [N] -> [N, 2]: 1 where the label is the best class (top-1), among the best
    five (top-5). Per sample, so that gather_for_metrics can drop the samples repeated across processes."""
    hit = scores.topk(min(5, scores.shape[1]), dim=1).indices == labels[:, None]  # [N, 5]: in rank order
    return torch.stack([hit[:, 0], hit.any(dim=1)], dim=1).long()


def accuracy(correct, num_classes):
    """top5_correct's rows for every test sample -> top-1 / top-5 in %; top-5 None with 5 classes or fewer."""
    top1, top5 = correct.sum(0).tolist()
    return {"top1": 100.0 * top1 / len(correct), "top5": 100.0 * top5 / len(correct) if num_classes > 5 else None}


def trained_record(name, settings, history):
    """The final epoch is the result; the best epoch is kept as a labelled extra (it peeks at the test split)."""
    final = history[-1]
    best = max(history, key=lambda h: (h["top1"], h["epoch"]))
    return {"rows": [{"name": name, "top1": final["top1"], "top5": final["top5"]}], "final_epoch": final["epoch"],
            "best_epoch_extra": {"epoch": best["epoch"], "top1": best["top1"], "top5": best["top5"],
                                 "note": "chosen on the test split: not the reported result"},
            "settings": settings, "history": history}


# ----------------------------------------------------------------------------- knn and linear-cached: frozen features


def frozen_features(backbone, splits, config, accelerator):
    """knn and linear-cached: {"train" / "test": (features, labels)}, extracted once without augmentation."""
    features = {}
    for name, split in (("train", splits.train), ("test", splits.test)):
        loader = accelerator.prepare_data_loader(image_loader(split, config, accelerator))
        progress = tqdm(loader, desc=f"features ({name})", disable=not accelerator.is_main_process, leave=False)
        features[name] = intl.extract_features(backbone, progress, accelerator)
    return features


def run_knn(features, config, device="cpu"):
    """The papers' k-NN (intl.knn_classify): Euclidean, one vote per neighbour; top-1 only."""
    (train_f, train_l), (test_f, test_l) = features["train"], features["test"]
    rows = []
    for asked in config.k:
        k = min(asked, len(train_f))  # the row's name says which k was really used
        top1 = intl.knn_classify(train_f, train_l, test_f, test_l, k=k, device=device)["top1"]
        rows.append({"name": f"{k}-NN (euclidean)", "top1": top1, "top5": None})
    return {"rows": rows, "settings": {"metric": "euclidean", "k": config.k}, "n_evaluated": len(test_f)}


def run_linear_cached(features, num_classes, config, accelerator):
    """Adam on the cached features: every process trains the same head on all of them (they are gathered)."""
    settings = protocol_settings("linear-cached", config)
    epochs, device = settings["epochs"], accelerator.device
    train_f, train_l = (tensor.to(device) for tensor in features["train"])
    test_f, test_l = (tensor.to(device) for tensor in features["test"])
    set_seed(config.seed)
    head = nn.Linear(train_f.shape[1], num_classes).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    gamma = (settings["min_lr"] / settings["lr"]) ** (1 / epochs)  # the authors' (1e-4) ** (1 / 500) by default
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma)
    order = torch.Generator().manual_seed(config.seed)
    history = []
    for epoch in tqdm(range(epochs), desc="linear-cached", disable=not accelerator.is_main_process, leave=False):
        lr = optimizer.param_groups[0]["lr"]
        for batch in torch.randperm(len(train_f), generator=order).split(settings["batch_size"]):
            batch = batch.to(device)
            loss = F.cross_entropy(head(train_f[batch]), train_l[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            history.append({"epoch": epoch + 1, "lr": lr, **accuracy(top5_correct(head(test_f), test_l), num_classes)})
    return {**trained_record("linear on cached features", settings, history), "n_evaluated": len(test_f)}


# ----------------------------------------------------------------------------- linear and finetune: trained on images


def run_trained_protocol(protocol, checkpoint, config, backbone, splits, accelerator):
    """linear or finetune: SGD on augmented training images, tested and saved every epoch; continued from
    `checkpoint` if not None. -> the protocol's record, or None after --stop_after_epochs."""
    finetune = protocol == "finetune"
    train_split = training_subset(splits.train, config.subset_file) if finetune else splits.train
    settings = {**protocol_settings(protocol, config), **config.backbone_id, "batch_size_is": "global",
                "image_size": config.image_size, "processes": accelerator.num_processes,
                "n_train": len(train_split.dataset), "subset_file": config.subset_file if finetune else None}
    pretrained = {key: value.clone() for key, value in backbone.state_dict().items()}  # linear checks it is unchanged
    model, optimizer = model_and_optimizer(finetune, backbone, splits.num_classes, settings)
    train_loader = image_loader(train_split, config, accelerator, settings["batch_size"])
    test_loader = image_loader(splits.test, config, accelerator)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    checkpoints = Path(config.output_dir) / "checkpoints" / protocol
    start_epoch, history = resume_or_start(checkpoint, settings, accelerator)

    def forward(images):
        if finetune:
            return model(images)
        with torch.no_grad():
            features = backbone(images)
        return model(features.float())

    # After every epoch, in one place: the history entry, the test accuracy, the checkpoint, the stop.
    epochs, epoch = settings["epochs"], start_epoch
    progress = tqdm(total=epochs * len(train_loader), initial=start_epoch * len(train_loader), desc=protocol,
                    disable=not accelerator.is_main_process, leave=False)
    try:
        for epoch in range(start_epoch, epochs):
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * lr_factor(settings["schedule"], epoch, epochs, config.milestones)
            train_loader.set_epoch(epoch)
            model.train()  # linear's model is the head alone: the frozen backbone's BN statistics stay as they are
            loss = train_one_epoch(forward, optimizer, train_loader, progress, accelerator)
            entry = {"epoch": epoch + 1, "train_loss": loss,
                     **{f"lr_{group['name']}": group["lr"] for group in optimizer.param_groups}}
            model.eval()
            entry.update(evaluate(forward, test_loader, splits.num_classes, accelerator))
            history.append(entry)
            save_epoch(checkpoints, epoch + 1, settings, history, accelerator)
            if config.stop_after_epochs is not None and config.stop_after_epochs <= epoch + 1 < epochs:
                break
    except KeyboardInterrupt:
        raise intl.Interrupted(f"epoch {epoch + 1} of {protocol}", newest_checkpoint(checkpoints)) from None
    finally:
        progress.close()  # before any message, so that the message is not drawn over
    if history[-1]["epoch"] < epochs:  # --stop_after_epochs
        accelerator.print(f"{protocol}: stopped after epoch {history[-1]['epoch']} of {epochs}; continue with "
                          "--resume latest")
        return None
    name = f"fine-tune on {settings['n_train']} images" if finetune else "linear (ImageNet protocol)"
    record = trained_record(name, settings, history)
    if not finetune:
        record["backbone_unchanged"] = check_backbone_unchanged(backbone, pretrained)
    return record


def model_and_optimizer(finetune, backbone, num_classes, settings):
    """A head from N(0, 0.01), alone (linear) or on a trained copy of the backbone with the authors' plain BatchNorm,
    per process (finetune); SGD with momentum, inside LARC for CW-RGP's linear protocol."""
    set_seed(settings["seed"])
    head = nn.Linear(backbone.feature_dim, num_classes)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    scale = settings["batch_size"] / 256
    model, groups = head, [{"name": "head", "params": list(head.parameters()), "base_lr": settings["lr"] * scale}]
    if finetune:
        backbone = copy.deepcopy(backbone).requires_grad_(True)  # the other protocols keep the pretrained one
        model = nn.Sequential(OrderedDict(backbone=backbone, head=head))
        groups.append({"name": "backbone", "params": list(model.backbone.parameters()),
                       "base_lr": settings["lr_backbone"] * scale})
    sgd = dict(lr=0.0, momentum=0.9, weight_decay=settings["weight_decay"])
    if settings.get("larc_trust"):
        return model, LarcSGD(groups, settings["larc_trust"], **sgd)
    return model, torch.optim.SGD(groups, **sgd)


class LarcSGD(torch.optim.SGD):
    """SGD whose every parameter p steps with lr x trust x ||p|| / (||g|| + wd ||p||), g its gradient (1 where either
    norm is 0): LARC without clipping. The weight decay joins the gradient before that scaling (SGD's own stays 0)."""

    def __init__(self, params, trust, weight_decay=0.0, **sgd):
        super().__init__(params, weight_decay=0.0, **sgd)
        self.trust, self.decay = trust, weight_decay

    @torch.no_grad()
    def step(self, closure=None):
        for p in [p for group in self.param_groups for p in group["params"] if p.grad is not None]:
            p_norm, g_norm = p.norm(), p.grad.norm()
            local_lr = torch.where((p_norm > 0) & (g_norm > 0), self.trust * p_norm / (g_norm + self.decay * p_norm),
                                   torch.ones_like(p_norm))
            p.grad.add_(p, alpha=self.decay).mul_(local_lr)
        return super().step(closure)


def train_one_epoch(forward, optimizer, loader, progress, accelerator):
    """One pass over the training images -> the mean loss of all processes."""
    loss_sum = torch.zeros((), device=accelerator.device)
    for images, labels in loader:
        if intl.stop_requested:  # a Ctrl-C or SIGTERM that a finaliser swallowed
            raise KeyboardInterrupt
        with accelerator.autocast():
            loss = F.cross_entropy(forward(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        loss_sum += loss.detach()
        progress.update(1)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    return accelerator.reduce(loss_sum / len(loader), "mean").item()


class EpochSampler(torch.utils.data.Sampler):
    """intl.epoch_order as a sampler: the same order on every process, replayed by a resumed run."""

    def __init__(self, num_samples, seed):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch):  # Accelerate's loader passes its set_epoch on
        self.epoch = epoch

    def __len__(self):
        return self.num_samples

    def __iter__(self):
        return iter(intl.epoch_order(self.num_samples, self.seed, self.epoch).tolist())


def freeze(backbone):
    """The evaluated backbone: no gradients, BN in eval mode (running statistics are not updated)."""
    backbone.requires_grad_(False).eval()


def check_backbone_unchanged(backbone, pretrained):
    """Every weight and buffer (BN running statistics included) bit-identical to before training."""
    for key, value in backbone.state_dict().items():
        if not torch.equal(value.detach().cpu(), pretrained[key].cpu()):
            raise ValueError(f"the frozen backbone changed during linear evaluation ({key!r} differs): "
                             "the result is not a linear evaluation of the pretrained weights")
    return True


def lr_factor(schedule, epoch, epochs, milestones):
    """step (INTL's linear): x0.1 after each milestone; cosine (CW-RGP's linear): per epoch, from 1 towards 0;
    constant (finetune: the authors' milestones lie beyond its 20 epochs)."""
    if schedule == "step":
        return 0.1 ** sum(int(epoch) >= round(m * epochs) for m in milestones)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return 1.0


@torch.no_grad()
def evaluate(forward, loader, num_classes, accelerator):
    """Top-1 / top-5 (%) over every test image exactly once (gather_for_metrics drops the padded tail)."""
    correct = []
    for images, labels in loader:
        with accelerator.autocast():
            logits = forward(images)
        correct.append(accelerator.gather_for_metrics(top5_correct(logits.float(), labels)))
    correct = torch.cat(correct)
    return {**accuracy(correct, num_classes), "n_evaluated": len(correct)}


# ----------------------------------------------------------------------------- checkpoints


def save_epoch(root, epoch, settings, history, accelerator):
    intl.save_state_atomically(accelerator, root / f"epoch-{epoch:04d}", "trainer_state.json",
                               {"epoch": epoch, "config": settings, "history": history}, keep=1)


def newest_checkpoint(root):
    saved = max(root.glob("epoch-*/trainer_state.json"), default=None)
    return saved.parent if saved else None


def checkpoints_to_resume(config):
    """{trained protocol: the checkpoint it continues from, None for a new start}: for --resume latest the newest
    in OUTPUT_DIR/checkpoints/<protocol>/; a checkpoint folder there is for the run's one trained protocol."""
    roots = {p: Path(config.output_dir) / "checkpoints" / p for p in config.protocol if p in TRAINED}
    if config.resume is None:
        return dict.fromkeys(roots)
    if config.resume != "latest":
        folder = intl.find_checkpoint(config.resume, config.output_dir)
        if len(roots) != 1 or folder.resolve().parent != next(iter(roots.values())).resolve():
            raise ValueError(f"--resume {config.resume}: not a checkpoint of the one trained --protocol in "
                             f"{Path(config.output_dir) / 'checkpoints'}/<protocol>/; give one, or 'latest'")
        return dict.fromkeys(roots, folder)
    found = {p: newest_checkpoint(root) for p, root in roots.items()}
    if missing := [roots[p] for p, folder in found.items() if folder is None]:
        raise ValueError(f"--resume latest: no checkpoint in {missing[0]}; start without --resume")
    return found


def checked_backbone(resumed, source, backbone):
    """-> the backbone's identity, its path (resolved where local) and the sha256 of its weights, which a resumed
    evaluation shares with its checkpoints (their settings); another backbone is refused before any protocol runs."""
    digest = hashlib.sha256()
    for key, value in backbone.state_dict().items():
        digest.update(key.encode() + value.cpu().numpy().tobytes())
    path = Path(os.path.expanduser(source))
    identity = {"backbone": str(path.resolve()) if path.exists() else source, "backbone_sha256": digest.hexdigest()}
    for checkpoint in filter(None, resumed.values()):
        saved = intl.read_trainer_state(Path(checkpoint) / "trainer_state.json")["config"]
        if intl.changed_settings(saved, identity):
            raise ValueError(f"--resume: {checkpoint} evaluates backbone {saved.get('backbone')} (sha256 "
                             f"{str(saved.get('backbone_sha256'))[:12]}), not --backbone {identity['backbone']} "
                             f"(sha256 {identity['backbone_sha256'][:12]}): give that one, or another --output_dir")
    return identity


def resume_or_start(checkpoint, settings, accelerator):
    """-> (the epoch to start from, the history so far) of `checkpoint`, whose settings must be these; else (0, [])."""
    if checkpoint is None:
        return 0, []

    def same_settings(folder, state):
        if not (isinstance(state.get("epoch"), int) and isinstance(state.get("history"), list)):
            raise ValueError(f"--resume: {folder} lacks the epoch or history of the evaluation: the file is damaged")
        saved = state["config"]  # the protocol's settings
        if changed := intl.changed_settings(saved, settings):
            raise ValueError(f"--resume: {changed[0]} is {settings[changed[0]]!r} now but {saved.get(changed[0])!r} "
                             f"in {folder}; a resumed evaluation keeps its settings")

    _, state = intl.load_checkpoint(accelerator, str(checkpoint), None, check_state=same_settings)
    accelerator.print(f"{checkpoint.parent.name}: resumed after epoch {state['epoch']}")
    return state["epoch"], state["history"]


# ----------------------------------------------------------------------------- publishing: `linear_eval.py export`


def main_export(argv=None):
    """`python linear_eval.py export`: the export folder (model.safetensors, config.json, README.md) of a checkpoint
    folder, an official .pth.tar or any loadable backbone, its card with the evaluation's results; optionally pushed."""
    parser = argparse.ArgumentParser(prog="linear_eval.py export", description=main_export.__doc__,
                                     allow_abbrev=False, formatter_class=intl.HelpFormatter)
    parser.add_argument("--source", required=True, help="a pretrain checkpoint folder, an official .pth.tar, an "
                        "export folder, a .safetensors file or a Hub repo id 'owner/name'")
    parser.add_argument("--arch", choices=intl.RESNETS, help="encoder of a .pth.tar or .safetensors file; None: the "
                        "file's, or inferred from its shapes")
    parser.add_argument("--stem", choices=intl.STEMS, help="first layers of such a file; None: 'cifar' for a 3x3 "
                        "conv1 (INTL's); CW-RGP's must say: cifar-unpadded (CIFAR) or small-maxpool (STL-10 / Tiny)")
    parser.add_argument("--output_dir", type=intl.folder, required=True, help="the export folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an export already in --output_dir")
    parser.add_argument("--eval_results", nargs="*", default=[], help="linear_eval.py results for the model card")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", help="the Hub model repo to publish the export to")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--license", help="the model card's license, a Hub id such as apache-2.0; None: none chosen")
    args = parser.parse_args(argv)
    export_dir = Path(args.output_dir)
    held = sorted(p.name for p in export_dir.iterdir()) if export_dir.is_dir() else []
    if held and (not args.overwrite or set(held) - {*intl.EXPORT_FILES, "README.md"}):
        raise ValueError(f"--output_dir {export_dir} holds {', '.join(held)}; an export replaces the whole folder: "
                         "give a new folder, or add --overwrite to replace an export")
    export_backbone_from(args.source, export_dir, args.arch, args.eval_results, args.push_to_hub, args.stem,
                         args.license)  # the source may be this export: it is read before the new one replaces it
    print(f"exported {args.source} to {export_dir}")
    if args.push_to_hub:  # a refusal (no token, no right to the namespace) ends in the library's words
        push_export_to_hub(export_dir, args.push_to_hub, args.private)
        print(f"pushed {export_dir} to https://huggingface.co/{args.push_to_hub}")
    return export_dir


def export_backbone_from(source, output_dir, arch=None, results=None, repo_id=None, stem=None, license=None):
    """The export folder of `source` (see `converted`), with the model card of `model_card`, written as one."""
    weights, config = converted(source, arch, stem)
    intl.write_export(output_dir, weights, config, model_card(config, results, repo_id, license))
    return Path(output_dir)


def converted(source, arch=None, stem=None):
    """-> (weights, config) of the export of `source`: a backbone intl.load_backbone reads, an official INTL / CW-RGP
    .pth.tar or a bare .safetensors file of torchvision keys (arch, stem: where such a file does not say them)."""
    path = Path(os.path.expanduser(os.fspath(source)))
    if path.is_file():
        weights, config = read_weights_file(path)
        intl.check_weights(weights, f"the weights of {source}")
        config = completed_config(config, weights, arch, stem, source)
        backbone = intl.backbone_from(weights, config, path)
    else:
        backbone, config = intl.load_backbone(source)  # its config says the arch and stem
    # A local path is named by its last part only: the config may be published on the Hub.
    return backbone.state_dict(), {**config, "converted_from": path.name if path.exists() else os.fspath(source)}


def read_weights_file(path):
    """A bare .safetensors file, or an official checkpoint {"state_dict": ...}, its backbone under "module.backbone."
    (INTL), "model.module." (CW-RGP's small data) or "module.model." (its ImageNet) -> (weights, the file's config)."""
    if path.suffix == ".safetensors":
        return intl.read_safetensors(path), {}
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load and pickle raise many types on a damaged file
        raise intl.unreadable(path, error) from None
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"{path} holds no state_dict of tensors (expected a dict with a 'state_dict' entry, "
                         "as the official INTL / CW-RGP checkpoints)")
    cw_rgp = any(k.startswith(("module.model.", "model.")) for k in state_dict)
    config = {"source_format": f"official {'CW-RGP' if cw_rgp else 'INTL'} checkpoint"}
    if checkpoint.get("arch") in intl.RESNETS:  # the official ImageNet scripts save it next to the state_dict
        config["arch"] = checkpoint["arch"]
    prefixes = ("module.backbone.", "backbone.", "model.module.", "module.model.", "model.")
    for prefix in prefixes:
        if weights := {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}:
            return weights, config
    raise ValueError(f"{path} has no backbone weights: no key starts with {' or '.join(map(repr, prefixes))} "
                     f"(first keys: {', '.join(map(repr, list(state_dict)[:3])) or 'none'})")


def completed_config(config, weights, arch, stem, source):
    """Arch, stem, input size and normalisation: the given ones first, then the file's, then what the weights say: a
    7x7 conv1 is the ImageNet stem, a 3x3 one INTL's CIFAR network, the arch the ResNet the weights fit exactly."""
    small_conv1 = "conv1.weight" in weights and tuple(weights["conv1.weight"].shape[-2:]) == (3, 3)
    if not stem and config.get("source_format") == "official CW-RGP checkpoint" and small_conv1:
        raise ValueError(f"{source} is a CW-RGP checkpoint with a 3x3 conv1, which may or may not be followed by a "
                         "max-pool: pass --stem cifar-unpadded (its CIFAR network) or --stem small-maxpool (its STL-10 "
                         f"and Tiny-ImageNet network); the stems: {', '.join(intl.STEMS)}")
    stem = stem or ("cifar" if small_conv1 else "imagenet")

    def fits(candidate):
        with torch.device("meta"):  # no memory
            return not intl.weights_mismatch(intl.build_backbone(candidate, stem).state_dict(), weights)

    arch = arch or config.get("arch") or next(filter(fits, intl.RESNETS), None)
    if arch is None:
        raise ValueError(f"cannot infer the architecture of {source}: its weights fit none of "
                         f"{', '.join(intl.RESNETS)} exactly; pass --arch to see which keys differ")
    small = stem != "imagenet"
    return {**config, "arch": arch, "stem": stem, "image_size": 32 if small else 224,
            "mean": list(intl.CIFAR_MEAN if small else intl.IMAGENET_MEAN),
            "std": list(intl.CIFAR_STD if small else intl.IMAGENET_STD)}


def hub_dataset_id(dataset):
    """`dataset` if it is a Hub dataset id ('owner/name'), else None (a local folder, digits)."""
    local = not isinstance(dataset, str) or intl.looks_like_path(dataset) or os.path.exists(dataset)
    return None if local or dataset.count("/") != 1 else dataset


def model_card(config, results=None, repo_id=None, license=None):
    """The model card: Hub metadata, results (on a Hub dataset also in the model-index, whose dataset type is a Hub
    id), loading and citations. license: a Hub id; None: the card says none was chosen."""
    records = [intl.read_json(item) if isinstance(item, (str, os.PathLike)) else item for item in results or []]
    if not all(isinstance(record, dict) and "rows" in record for record in records):
        raise ValueError("--eval_results: an evaluation result is linear_eval.py's JSON (a dict with 'rows')")
    dataset, stem, size = config.get("dataset"), config.get("stem", "imagenet"), config.get("image_size")
    name = repo_id.split("/")[-1] if repo_id else f"intl-{config.get('arch')}-{Path(str(dataset or 'digits')).name}"
    eval_results = [huggingface_hub.EvalResult(
        task_type="image-classification", task_name="Image classification", metric_type="accuracy",
        dataset_type=record["dataset"], dataset_name=record["dataset"], dataset_split=record.get("test_split"),
        metric_value=round(float(row[key]), 2), metric_name=f"{row['name']} {metric} accuracy (%)")
        for record in records if hub_dataset_id(record.get("dataset")) for row in record["rows"]
        for metric, key in (("top-1", "top1"), ("top-5", "top5")) if row.get(key) is not None]
    metadata = huggingface_hub.ModelCardData(
        library_name="pytorch", pipeline_tag="image-feature-extraction", license=license,
        tags=["self-supervised", "intl", "image-feature-extraction", "resnet", "torchvision", "safetensors"],
        model_name=name if eval_results else None, eval_results=eval_results or None,
        datasets=[dataset] if hub_dataset_id(dataset) and not config.get("dataset_is_local_folder") else None)
    table = ["| protocol | dataset (split) | top-1 | top-5 |", "|---|---|---|---|"] + [
        f"| {row['name']} | {hub_dataset_id(r.get('dataset')) or Path(str(r.get('dataset'))).name} "
        f"({r.get('test_split')}) | "
        + " | ".join("-" if row.get(key) is None else f"{row[key]:.2f}" for key in ("top1", "top5")) + " |"
        for r in records for row in r["rows"]]
    kernel, stride, padding, maxpool = intl.STEMS[stem]
    stem_code = "" if stem == "imagenet" else (
        f"net.conv1 = torch.nn.Conv2d(3, 64, kernel_size={kernel}, stride={stride}, padding={padding}, bias=False)\n"
        + ("" if maxpool else "net.maxpool = torch.nn.Identity()\n"))
    body = CARD.format(
        name=name, arch=config.get("arch"), dim=config.get("feature_dim", "D"), size=size, stem_code=stem_code,
        repo=repo_id or "OWNER/NAME", resize=intl.eval_resize(size, config.get("eval_resize")) if size else "?",
        mean=list(config.get("mean", [])), std=list(config.get("std", [])),
        table="\n".join(table) if records else "No evaluation results were recorded with this export.",
        license_note="" if license else "\nNo license was chosen for these weights by their publisher.")
    return str(huggingface_hub.ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}{CITATIONS}"))  # parses: valid


CARD = """
# {name}

A {arch} encoder pretrained with **IterNorm with trace loss** (INTL: "Modulate Your Spectrum in Self-Supervised
Learning", Weng et al., ICLR 2024), published alone: a torchvision `state_dict` without `fc.*`, {dim}-dimensional
features. `config.json` holds the recipe it was trained with.

## Evaluation (frozen features: `linear_eval.py`)

{table}

## Usage

```python
import torch, torchvision
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
from torchvision.transforms import v2 as T

net = torchvision.models.{arch}()
{stem_code}net.fc = torch.nn.Identity()
net.load_state_dict(load_file(hf_hub_download("{repo}", "model.safetensors")))  # strict
net.eval()  # net(preprocess(rgb_image)[None]) -> features [1, {dim}]
preprocess = T.Compose([T.Resize({resize}, interpolation=T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop({size}),
                        T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize({mean}, {std})])
```

From a clone of the INTL repository that made this model: `import intl; net, config = intl.load_backbone("{repo}")`.
{license_note}

## Citation

"""
CITATIONS = """```bibtex
@inproceedings{weng2024modulate,
  title     = {Modulate Your Spectrum in Self-Supervised Learning},
  author    = {Weng, Xi and Ni, Yunhao and Song, Tengwei and Luo, Jie and Anwer, Rao Muhammad and Khan, Salman and \
Khan, Fahad Shahbaz and Huang, Lei},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024}
}
@inproceedings{weng2022investigation,
  title     = {An Investigation into Whitening Loss for Self-supervised Learning},
  author    = {Weng, Xi and Huang, Lei and Zhao, Lei and Anwer, Rao Muhammad and Khan, Salman and Khan, Fahad Shahbaz},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2022}
}
```
"""


def push_export_to_hub(export_dir, repo_id, private=False):
    """One commit to the main branch of a Hub model repo: exactly the export's weights, config.json and model card."""
    api = huggingface_hub.HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=export_dir, repo_type="model",
                             allow_patterns=[*intl.EXPORT_FILES, "README.md"],
                             commit_message=f"Upload INTL backbone from {Path(export_dir).name}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["export"]:
        intl.run(main_export, sys.argv[2:])
    else:
        intl.run(main, interrupted="interrupted (knn and linear-cached keep no checkpoints: run the command again)")
