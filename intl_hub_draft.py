# --- Extra imports: the lead moves these to the top of intl.py. ---------------------------------
# The `from intl import ...` line exists only while this is a separate file: drop it when appending.
import argparse
import pickle
import tempfile

import huggingface_hub.errors  # the package's lazy loader does not expose `errors` without this
from safetensors import SafetensorError
from safetensors.torch import load_file

# Already at the top of intl.py (needed here only while this is a separate file):
import json
import os
import shutil
from pathlib import Path

import huggingface_hub
import torch

from intl import RESNETS, _hub_offline_requested, _hub_reachable, _looks_like_path, build_backbone, write_export
# --- end of the import block ----------------------------------------------------------------------


# =============================================================================
# Loading a backbone from anywhere, and publishing it on the Hugging Face Hub
#
# load_backbone(source) accepts, and always loads strictly:
#   1. an export folder (model.safetensors + config.json), or a bare .safetensors file (+ arch)
#   2. a Hub model repo id "owner/name" or "owner/name@revision" (cached by huggingface_hub;
#      HF_HUB_OFFLINE=1 reads the local Hub cache only)
#   3. a pretrain.py checkpoint folder (model.safetensors with backbone.* keys + trainer_state.json)
#   4. an official INTL / CW-RGP checkpoint (.pth.tar: {"state_dict": {"module.backbone.*": ...}})
# Every backbone comes with its config: arch, cifar_stem, feature_dim, image_size, mean, std, and
# whatever the export recorded about its training.

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
EXPORT_FILES = ("model.safetensors", "config.json")
_OFFICIAL_PREFIXES = ("module.backbone.", "backbone.")


def load_backbone(source, arch=None, revision=None):
    """Any supported source -> (backbone nn.Module in eval mode, config dict).

    arch: required for a bare .safetensors file or an official checkpoint only when it cannot be
    inferred from the weights' shapes; given for the other sources, it must match the weights.
    revision: a Hub branch, tag or commit (same as "id@revision").
    Raises ValueError for anything that does not load, never returns a half-loaded model.
    """
    weights, config = load_backbone_weights(source, arch, revision)
    backbone = build_backbone(config["arch"], config["cifar_stem"])
    _load_strict(backbone, weights, f"{source} ({config['arch']}{', CIFAR stem' if config['cifar_stem'] else ''})")
    config["feature_dim"] = backbone.feature_dim
    return backbone.eval(), config


def load_backbone_weights(source, arch=None, revision=None):
    """Any supported source -> (state_dict with torchvision keys without fc.*, config dict). Not yet checked."""
    if source is None or str(source).strip() == "":
        raise ValueError("no backbone given: pass an export folder, a .safetensors file, a Hub repo id, "
                         "a pretrain checkpoint folder or an official .pth.tar checkpoint")
    source = os.fspath(source)
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        if (path / "trainer_state.json").is_file() and (path / "model.safetensors").is_file():
            weights, config = _read_pretrain_checkpoint(path)
        elif (path / "model.safetensors").is_file():
            weights, config = _read_export_folder(path)
        else:
            raise ValueError(f"{source} is a folder but neither an export (model.safetensors + config.json) nor a "
                             "pretrain checkpoint (model.safetensors + trainer_state.json)")
    elif path.is_file():
        if path.suffix == ".safetensors":
            weights, config = _read_safetensors(path), {}
        else:
            weights, config = _read_official_checkpoint(path)
    elif _looks_like_path(source) or path.suffix in (".safetensors", ".pth", ".tar", ".pt", ".bin") \
            or source.count("/") != 1:
        raise ValueError(f"backbone {source!r} not found: no such file or folder (and not a Hub repo id "
                         "'owner/name[@revision]')")
    else:
        weights, config = _download_from_hub(source, revision)
    return weights, _complete_config(config, weights, arch, source)


def _read_safetensors(path):
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"cannot read {path} as safetensors: {error}") from None


def _read_export_folder(folder):
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    return _read_safetensors(folder / "model.safetensors"), config


def _read_pretrain_checkpoint(folder):
    """pretrain.py's checkpoint: keys backbone.* / projector.* / target.*, the run's config in trainer_state.json."""
    state = json.loads((folder / "trainer_state.json").read_text())
    weights = _strip_prefix(_read_safetensors(folder / "model.safetensors"), ("backbone.",), folder)
    train = state.get("config", {})
    config = {key: train[key] for key in ("arch", "cifar_stem", "image_size", "mean", "std", "method", "preset",
                                          "dataset", "projector", "iters", "axis") if key in train}
    config.update(epochs_trained=state.get("epochs_trained"), steps_trained=state.get("step"))
    return weights, config


def _read_official_checkpoint(path):
    """An official .pth.tar: {"state_dict": {"module.backbone.conv1.weight": ...}, ...}, read with weights_only."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path} cannot be read safely (torch.load with weights_only=True refused it: "
                         f"{first_line}); only checkpoints of tensors and plain containers are loaded") from None
    except (RuntimeError, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error})") from None
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(f"{path} holds no state_dict of tensors (expected a dict with a 'state_dict' entry, "
                         "as the official INTL / CW-RGP checkpoints)")
    config = {"source_format": "official INTL / CW-RGP checkpoint"}
    if checkpoint.get("arch") in RESNETS:  # the official ImageNet scripts save it next to the state_dict
        config["arch"] = checkpoint["arch"]
    return _strip_prefix(state_dict, _OFFICIAL_PREFIXES, path), config


def _strip_prefix(state_dict, prefixes, where):
    """The backbone's entries of a whole-model state_dict, with the first matching prefix removed."""
    for prefix in prefixes:
        weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if weights:
            return weights
    shown = ", ".join(repr(k) for k in list(state_dict)[:3])
    raise ValueError(f"{where} has no backbone weights: no key starts with {' or '.join(map(repr, prefixes))} "
                     f"(first keys: {shown or 'none'})")


def _complete_config(config, weights, arch, source):
    """Fill in arch, stem, input size and normalisation; the weights decide what the config does not say."""
    config = dict(config)
    if "cifar_stem" not in config:
        conv1 = weights.get("conv1.weight")
        config["cifar_stem"] = conv1 is not None and tuple(conv1.shape[-2:]) == (3, 3)
    if arch is not None:
        if arch not in RESNETS:
            raise ValueError(f"unknown --arch {arch!r}: choose one of {', '.join(RESNETS)}")
        config["arch"] = arch
    elif "arch" not in config:
        config["arch"] = _infer_arch(weights, config["cifar_stem"], source)
    cifar = config["cifar_stem"]
    config.setdefault("image_size", 32 if cifar else 224)
    config.setdefault("mean", list(CIFAR_MEAN if cifar else IMAGENET_MEAN))
    config.setdefault("std", list(CIFAR_STD if cifar else IMAGENET_STD))
    config.setdefault("format", "torchvision state_dict without fc.*")
    return config


def _infer_arch(weights, cifar_stem, source):
    """The ResNet whose state_dict has exactly these keys and shapes (built on the meta device: no memory)."""
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    for arch in RESNETS:
        with torch.device("meta"):
            candidate = build_backbone(arch, cifar_stem)
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            return arch
    raise ValueError(f"cannot infer the architecture of {source}: its weights fit none of {', '.join(RESNETS)} "
                     "exactly; pass --arch to see which keys differ")


def _load_strict(module, weights, what):
    """load_state_dict that refuses any difference, naming the first missing, unexpected and mis-shaped keys."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshaped = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or misshaped:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
        if misshaped:
            k = misshaped[0]
            problems.append(f"{len(misshaped)} key(s) of another shape, first {k!r}: "
                            f"{tuple(weights[k].shape)} in the weights, {tuple(expected[k].shape)} in the model")
        raise ValueError(f"the weights do not fit {what}: {'; '.join(problems)}. Check --arch (and the stem)")
    module.load_state_dict(weights, strict=True)


# ----------------------------------------------------------------------------- Hub: download


def _download_from_hub(source, revision=None):
    """'owner/name[@revision]' -> (weights, config) through huggingface_hub's cache.

    With HF_HUB_OFFLINE=1, or when the Hub cannot be reached, only the local Hub cache is read.
    """
    repo_id, _, at_revision = source.partition("@")
    if at_revision and revision and at_revision != revision:
        raise ValueError(f"two revisions for {repo_id}: {at_revision!r} (in the id) and {revision!r}")
    revision = at_revision or revision or None
    offline = _hub_offline_requested() or not _hub_reachable()
    where = f"Hub model {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    files = {}
    try:
        for filename in EXPORT_FILES:
            files[filename] = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision,
                                                              local_files_only=offline)
    except huggingface_hub.errors.RevisionNotFoundError:
        raise ValueError(f"{where}: no such revision") from None
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise ValueError(f"{where} not found (or private / gated without a token: see `hf auth login`)") from None
    except huggingface_hub.errors.LocalEntryNotFoundError:
        reason = ("offline mode is on (HF_HUB_OFFLINE)" if _hub_offline_requested()
                  else f"the Hub ({huggingface_hub.constants.ENDPOINT}) is not reachable")
        raise ValueError(f"{where}: {reason} and the local Hub cache ({huggingface_hub.constants.HF_HUB_CACHE}) "
                         f"has no {filename} for it; run once with network access, or pass a local "
                         "export folder") from None
    except huggingface_hub.errors.EntryNotFoundError:
        raise ValueError(f"{where} has no {filename}: it is not an export of this project "
                         f"(expected {' + '.join(EXPORT_FILES)})") from None
    except huggingface_hub.errors.HFValidationError as error:
        raise ValueError(f"{source!r} is not a Hub repo id 'owner/name[@revision]' nor a local path ({error})") from None
    except huggingface_hub.errors.HfHubHTTPError as error:
        raise ValueError(f"{where}: the Hub answered {error}") from None
    config = json.loads(Path(files["config.json"]).read_text())
    config["hub_repo"] = repo_id + (f"@{revision}" if revision else "")
    return _read_safetensors(files["model.safetensors"]), config


# ----------------------------------------------------------------------------- conversion


def export_backbone_from(source, output_dir, arch=None):
    """Convert any loadable backbone (a pretrain checkpoint, an official .pth.tar, ...) into an export folder.

    output_dir becomes the export folder itself: model.safetensors (torchvision keys, no fc.*) +
    config.json, written atomically. An existing folder is replaced only if it is an export.
    """
    output_dir = Path(output_dir)
    if output_dir.exists():
        foreign = sorted(p.name for p in output_dir.iterdir() if p.name not in EXPORT_FILES + ("README.md",)) \
            if output_dir.is_dir() else [output_dir.name]
        if foreign:
            raise ValueError(f"--output_dir {output_dir} exists and is not an export folder (it holds {foreign[0]!r}); "
                             "the export replaces the whole folder, so give a new or an export folder")
    backbone, config = load_backbone(source, arch)
    config = {**config, "converted_from": os.fspath(source)}
    write_export(output_dir, backbone.state_dict(), config)
    return output_dir


# ----------------------------------------------------------------------------- model card

_CITATIONS = """\
@inproceedings{weng2024modulate,
  title     = {Modulate Your Spectrum in Self-Supervised Learning},
  author    = {Weng, Xi and Ni, Yunhao and Song, Tengwei and Luo, Jie and Anwer, Rao Muhammad and Khan, Salman and Khan, Fahad Shahbaz and Huang, Lei},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024}
}
@inproceedings{weng2022investigation,
  title     = {An Investigation into Whitening Loss for Self-supervised Learning},
  author    = {Weng, Xi and Huang, Lei and Zhao, Lei and Anwer, Rao Muhammad and Khan, Salman and Khan, Fahad Shahbaz},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2022}
}"""


def _is_hub_dataset_id(dataset):
    return isinstance(dataset, str) and dataset.count("/") == 1 and not _looks_like_path(dataset) \
        and not os.path.exists(dataset)


def _read_results(results):
    """Result records (linear_eval.py's JSON files, as dicts or paths) -> list of dicts."""
    records = []
    for item in results or []:
        if isinstance(item, (str, os.PathLike)):
            try:
                item = json.loads(Path(item).read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"cannot read the evaluation result {item}: {error}") from None
        if not isinstance(item, dict) or "rows" not in item:
            raise ValueError("an evaluation result must be linear_eval.py's JSON (a dict with 'rows')")
        records.append(item)
    return records


def write_model_card(export_dir, results=None, repo_id=None, license="other"):
    """Write export_dir/README.md: YAML metadata (with a model-index when results are given) + the card body.

    results: linear_eval.py result files (paths or loaded dicts); each row becomes model-index metrics.
    repo_id: the Hub repo the card will live in (used in the usage snippet).
    Returns the path of the README.
    """
    export_dir = Path(export_dir)
    _, config = load_backbone(export_dir)  # the completed config, and a check that the weights load
    records = _read_results(results)
    arch, cifar = config.get("arch", "resnet50"), bool(config.get("cifar_stem"))
    dataset = config.get("dataset")
    dataset_name = "digits (scikit-learn)" if dataset in (None, "digits") else str(dataset)
    model_name = repo_id.split("/")[-1] if repo_id else f"intl-{arch}-{Path(str(dataset or 'digits')).name}"

    eval_results = []
    for record in records:
        eval_dataset = record.get("dataset") or "digits"
        for row in record["rows"]:
            for metric, key in (("top-1", "top1"), ("top-5", "top5")):
                if row.get(key) is None:
                    continue
                eval_results.append(huggingface_hub.EvalResult(
                    task_type="image-classification", task_name="Image classification",
                    dataset_type=eval_dataset if _is_hub_dataset_id(eval_dataset) else Path(eval_dataset).name,
                    dataset_name=eval_dataset, dataset_split=record.get("test_split"),
                    metric_type="accuracy", metric_value=round(float(row[key]), 2),
                    metric_name=f"{row['name']} {metric} accuracy (%)"))
    card_data = huggingface_hub.ModelCardData(
        library_name="pytorch", license=license, pipeline_tag="image-feature-extraction",
        tags=["self-supervised", "intl", "image-feature-extraction", "resnet", "torchvision", "safetensors"],
        datasets=[dataset] if _is_hub_dataset_id(dataset) else None,
        model_name=model_name if eval_results else None, eval_results=eval_results or None)

    recipe = [f"| {name} | {config[key]} |" for key, name in (
        ("method", "method"), ("arch", "encoder"), ("cifar_stem", "CIFAR stem (3x3 conv1, no max-pool)"),
        ("projector", "projector widths"), ("iters", "IterNorm iterations T"), ("axis", "whitening axis"),
        ("dataset", "pretraining data"), ("image_size", "input size"), ("epochs_trained", "epochs"),
        ("preset", "preset"), ("converted_from", "converted from")) if config.get(key) is not None]
    table = ["| protocol | dataset (split) | top-1 | top-5 |", "|---|---|---|---|"]
    for record in records:
        for row in record["rows"]:
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            table.append(f"| {row['name']} | {record.get('dataset') or 'digits'} ({record.get('test_split')}) | "
                         f"{fmt(row.get('top1'))} | {fmt(row.get('top5'))} |")
    stem = ("net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)\n"
            "net.maxpool = torch.nn.Identity()\n") if cifar else ""
    body = f"""
# {model_name}

A {arch} encoder pretrained with **INTL** (IterNorm with trace loss, "Modulate Your Spectrum in
Self-Supervised Learning", Weng et al., ICLR 2024). Only the backbone is published: the projector is
dropped, and the weights are a torchvision `state_dict` without `fc.*`. The final layer outputs
{config.get('feature_dim', 'the')}-dimensional features.

## Recipe

| setting | value |
|---|---|
{chr(10).join(recipe)}

Input: RGB images resized to {config.get('image_size')} px, normalised with mean {list(config.get('mean', []))}
and std {list(config.get('std', []))}.

## Evaluation protocol

Frozen-feature evaluations as in the papers: k-NN (k = 5, Euclidean) and a linear classifier on
features extracted once without augmentation (Adam, lr 1e-2 decayed exponentially to 1e-6 over
500 epochs, weight decay 5e-6, batch 1000), or the ImageNet linear protocol (frozen backbone in eval
mode, SGD momentum 0.9, 100 epochs, lr x0.1 at epochs 60 and 80, RandomResizedCrop + flip for
training, Resize + CenterCrop for validation). The numbers are those of the final epoch.

{chr(10).join(table) if records else "No evaluation results were recorded with this export."}

## Usage (plain torchvision)

```python
import torch, torchvision
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

net = torchvision.models.{arch}()
{stem}net.fc = torch.nn.Identity()
net.load_state_dict(load_file(hf_hub_download("{repo_id or 'OWNER/NAME'}", "model.safetensors")))  # strict
net.eval()  # net(images) -> features [B, {config.get('feature_dim', 'D')}]
```

## Citation

```bibtex
{_CITATIONS}
```
"""
    card = huggingface_hub.ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    card.save(export_dir / "README.md")
    return export_dir / "README.md"


# ----------------------------------------------------------------------------- Hub: upload


def push_export_to_hub(export_dir, repo_id, private=False, commit_message=None, revision=None):
    """Upload an export folder (model.safetensors, config.json, README.md) to a Hub model repo.

    Exactly these three files are uploaded, from a staging folder; a missing README.md is generated
    (write_model_card without results). revision: a branch to push to, created when missing.
    Returns the commit info of the upload.
    """
    export_dir = Path(export_dir)
    missing = [name for name in EXPORT_FILES if not (export_dir / name).is_file()]
    if missing:
        raise ValueError(f"{export_dir} is not an export folder: {missing[0]} is missing")
    load_backbone(export_dir)  # refuse to publish weights that do not load
    api = huggingface_hub.HfApi()
    with tempfile.TemporaryDirectory(prefix="intl-upload-") as staging:
        for name in EXPORT_FILES:
            shutil.copy2(export_dir / name, Path(staging) / name)
        if (export_dir / "README.md").is_file():
            shutil.copy2(export_dir / "README.md", Path(staging) / "README.md")
        else:
            write_model_card(staging, repo_id=repo_id)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=staging, repo_type="model", revision=revision,
                                 commit_message=commit_message or f"Upload INTL backbone from {export_dir.name}")


# ----------------------------------------------------------------------------- the `export` command


def get_export_parser():
    parser = argparse.ArgumentParser(
        prog="intl.py export", allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Convert a pretrain checkpoint folder or an official INTL / CW-RGP .pth.tar (or any loadable "
                    "backbone) into an export folder: model.safetensors + config.json + README.md; optionally "
                    "push it to the Hugging Face Hub.")
    parser.add_argument("--source", required=True,
                        help="what to convert: a pretrain checkpoint folder, an official .pth.tar, an export "
                             "folder, a .safetensors file or a Hub repo id 'owner/name[@revision]'")
    parser.add_argument("--arch", choices=RESNETS, default=None,
                        help="encoder architecture (default: from the source's config, or inferred from the "
                             "weights' shapes)")
    parser.add_argument("--output_dir", required=True,
                        help="the export folder to write (replaced if it is already an export folder)")
    parser.add_argument("--eval_results", nargs="*", default=[],
                        help="linear_eval.py result JSON files to list in the model card's model-index")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", default=None,
                        help="also upload the export to this Hub model repo (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--commit_message", default=None, help="commit message of the Hub upload")
    parser.add_argument("--revision", default=None, help="Hub branch to upload to (created if missing)")
    return parser


def main_export(argv=None):
    """`python intl.py export ...`: raises ValueError on bad input (the caller prints `error: ...`)."""
    args = get_export_parser().parse_args(argv)
    export_dir = export_backbone_from(args.source, args.output_dir, args.arch)
    write_model_card(export_dir, args.eval_results, repo_id=args.push_to_hub)
    print(f"exported {args.source} to {export_dir}")
    if args.push_to_hub:
        push_export_to_hub(export_dir, args.push_to_hub, private=args.private,
                           commit_message=args.commit_message, revision=args.revision)
        print(f"pushed {export_dir} to https://huggingface.co/{args.push_to_hub}"
              + (f" (branch {args.revision})" if args.revision else ""))
    return export_dir
