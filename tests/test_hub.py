"""Loading backbones from every source, strictly; conversion; model cards; the Hub (offline: cache and a replaced upload)."""

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

import intl
from conftest import write_export
from intl import CIFAR_MEAN, load_backbone
from linear_eval import converted, export_backbone_from, main_export, push_export_to_hub

ROOT = Path(__file__).resolve().parents[1]
CONFIG = {"arch": "resnet18", "stem": "imagenet", "feature_dim": 512, "image_size": 16, "mean": [0.5] * 3,
          "std": [0.25] * 3, "method": "intl", "dataset": "uoft-cs/cifar10", "projector": "64-64-64",
          "epochs_trained": 2}


def backbone_weights(seed, arch="resnet18", stem="imagenet"):
    torch.manual_seed(seed)
    return intl.build_backbone(arch, stem).state_dict()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def _written_export(tmp_path_factory):
    """intl.write_export of backbone_weights(0) with CONFIG, once: `export` gives each test a copy."""
    folder = tmp_path_factory.mktemp("export") / "export"
    write_export(folder, backbone_weights(0), CONFIG)
    return folder


@pytest.fixture
def export(_written_export, tmp_path):
    """TMP/export: an export folder of backbone_weights(0) with CONFIG, this test's own copy (real copies, no links:
    tests damage its files)."""
    return shutil.copytree(_written_export, tmp_path / "export")


def test_an_export_round_trips_bit_identical_and_a_bare_file_is_exported_first_with_the_defaults(export, tmp_path):
    original = load_file(export / "model.safetensors")
    backbone, config = load_backbone(export)
    assert_same_weights(backbone.state_dict(), original)
    assert not backbone.training and config["image_size"] == 16 and config["mean"] == [0.5] * 3
    copy = export_backbone_from(export, tmp_path / "copy")
    assert_same_weights(load_file(copy / "model.safetensors"), original)
    # A bare file is exported first: the arch given or inferred from the shapes, the stem from the weights, the input
    # size and normalisation the defaults.
    with pytest.raises(ValueError, match="is a file: make it an export first \\(python linear_eval.py export"):
        load_backbone(export / "model.safetensors")
    for arch in ("resnet18", None):
        weights, config = converted(export / "model.safetensors", arch=arch)
        assert_same_weights(weights, original)
        assert (config["arch"], config["stem"], config["image_size"]) == ("resnet18", "imagenet", 224)


def test_a_loaded_backbone_is_a_trainable_float32_network_also_from_half_precision_weights(tmp_path):
    weights = {k: v.half() if v.is_floating_point() else v for k, v in backbone_weights(0).items()}
    backbone, _ = load_backbone(write_export(tmp_path / "half", weights, {}))
    state = backbone.state_dict()
    assert all(not t.is_meta for t in state.values())
    assert all(torch.equal(state[k], v.float() if v.is_floating_point() else v) for k, v in weights.items())
    assert {state[k].dtype for k in weights if weights[k].is_floating_point()} == {torch.float32}
    assert all(p.requires_grad for p in backbone.parameters())
    assert backbone(torch.randn(2, 3, 16, 16)).dtype == torch.float32


def test_pretrain_checkpoint_folder_gives_the_backbone_of_the_checkpoint(tmp_path):
    """The layout pretrain.py saves: the INTL module's state_dict (backbone., projector., target.) + trainer_state."""
    torch.manual_seed(0)
    backbone = intl.build_backbone("resnet18", "cifar")
    model = intl.INTL(backbone, intl.build_projector(512, "64-64-64"), momentum_target=True)
    with torch.no_grad():
        model.target[0].conv1.weight.add_(1.0)  # the EMA target differs from the online backbone
    checkpoint = tmp_path / "checkpoints" / "step-00000022"
    checkpoint.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, checkpoint / "model.safetensors")
    backbone_config = {"arch": "resnet18", "stem": "cifar", "image_size": 32, "mean": list(CIFAR_MEAN),
                       "std": [0.25] * 3, "method": "intl-m", "dataset": "uoft-cs/cifar10", "recipe": {"lr": 0.3}}
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 22, "epochs_trained": 2.0, "config": {},
                                                               "backbone": backbone_config}))
    export = export_backbone_from(checkpoint, tmp_path / "export")
    assert_same_weights(load_file(export / "model.safetensors"), backbone.state_dict())
    config = json.loads((export / "config.json").read_text())
    assert config["arch"] == "resnet18" and config["stem"] == "cifar" and config["method"] == "intl-m"
    assert config["epochs_trained"] == 2.0 and config["feature_dim"] == 512 and "lr" not in config


def official_checkpoint(path, weights, **extra):
    """The official INTL / CW-RGP layout: DDP's module. prefix, projector and optimizer state alongside."""
    state_dict = {f"module.backbone.{k}": v for k, v in weights.items()}
    state_dict["module.projector.0.weight"] = torch.randn(64, 512)
    torch.save({"epoch": 200, "state_dict": state_dict, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
                **extra}, path)
    return path


def test_official_checkpoint_converts_to_an_export_that_plain_torchvision_loads(tmp_path):
    weights = backbone_weights(1, "resnet18", "cifar")
    checkpoint = official_checkpoint(tmp_path / "intl_cifar10.pth.tar", weights)
    export = export_backbone_from(checkpoint, tmp_path / "export")  # arch inferred from the shapes
    config = json.loads((export / "config.json").read_text())
    assert (config["arch"], config["stem"], config["image_size"]) == ("resnet18", "cifar", 32)
    assert config["converted_from"] == "intl_cifar10.pth.tar"  # no local path: the config may go to the Hub
    net = torchvision.models.resnet18()
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, padding=2, bias=False)  # the authors' 1-pixel pad + padding 1
    net.maxpool = torch.nn.Identity()
    missing, unexpected = net.load_state_dict(load_file(export / "model.safetensors"), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert_same_weights({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, weights)


def cw_rgp_small_data_checkpoint(path, weights):
    """CW-RGP's base/train.py layout: an nn.DataParallel encoder under model.module.*, the projector under head.*."""
    state_dict = {f"model.module.{k}": v for k, v in weights.items()}
    state_dict["head.0.weight"] = torch.randn(1024, 512)
    torch.save({"epoch": 1000, "arch": "resnet18", "state_dict": state_dict,
                "optimizer": {"state": {}, "param_groups": [{"lr": 3e-3}]}}, path)
    return path


@pytest.mark.parametrize("stem", ["cifar-unpadded", "small-maxpool"])
def test_official_cw_rgp_small_data_checkpoint_loads_with_the_stem_named(tmp_path, stem):
    weights = backbone_weights(3, "resnet18", stem)
    checkpoint = cw_rgp_small_data_checkpoint(tmp_path / "cw_rgp.pth.tar", weights)
    backbone, config = load_backbone(export_backbone_from(checkpoint, tmp_path / "export", stem=stem))
    assert_same_weights(backbone.state_dict(), weights)
    assert (config["arch"], config["stem"], config["source_format"]) == ("resnet18", stem, "official CW-RGP checkpoint")
    assert config["maxpool"] == (stem == "small-maxpool") and config["conv1"]["padding"] == 1
    # The file cannot tell the two apart: without a stem the export asks for one instead of guessing.
    with pytest.raises(ValueError, match="CW-RGP checkpoint with a 3x3 conv1.*--stem cifar-unpadded.*--stem "
                                         "small-maxpool.*the stems: imagenet, cifar, cifar-unpadded, small-maxpool"):
        converted(checkpoint)


def test_official_checkpoint_is_read_with_weights_only(tmp_path):
    checkpoint = official_checkpoint(tmp_path / "unsafe.pth.tar", backbone_weights(0), args=argparse.Namespace(lr=1))
    with pytest.raises(ValueError, match="weights_only=True"):
        converted(checkpoint)
    torch.save({"state_dict": {"module.encoder.conv1.weight": torch.zeros(1)}}, tmp_path / "nobackbone.pth.tar")
    with pytest.raises(ValueError, match="no key starts with 'module.backbone.'"):
        converted(tmp_path / "nobackbone.pth.tar")


def test_strict_loading_names_the_first_missing_and_unexpected_keys(tmp_path):
    weights = backbone_weights(0)
    del weights["layer4.1.bn2.running_var"]
    weights["fc.weight"] = torch.zeros(10, 512)
    save_file(weights, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"1 missing key\(s\), first 'layer4.1.bn2.running_var'; "
                                         r"1 unexpected key\(s\), first 'fc.weight'"):
        converted(tmp_path / "bad.safetensors", arch="resnet18")
    save_file(backbone_weights(0), tmp_path / "r18.safetensors")
    with pytest.raises(ValueError, match="do not fit .*resnet34.* missing key\\(s\\), first 'layer1.2.conv1.weight'"):
        converted(tmp_path / "r18.safetensors", arch="resnet34")
    with pytest.raises(ValueError, match="of another shape, first 'layer1.0.conv1.weight'"):
        converted(tmp_path / "r18.safetensors", arch="resnet50")
    with pytest.raises(ValueError, match="cannot infer the architecture"):
        converted(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not found"):
        load_backbone(tmp_path / "missing.pth.tar")


def populate_hub_cache(cache, repo_id, revisions):
    """Write huggingface_hub's cache layout: blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/<name>."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    for ref, (commit, folder) in revisions.items():
        for name in ("model.safetensors", "config.json"):
            data = (folder / name).read_bytes()
            blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            pointer = storage / "snapshots" / commit / name
            pointer.parent.mkdir(parents=True, exist_ok=True)
            pointer.symlink_to(os.path.relpath(blob, pointer.parent))
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)


@pytest.mark.slow
def test_hub_id_and_revision_load_from_the_local_hub_cache_with_hf_hub_offline(export, tmp_path):
    other = tmp_path / "other"
    write_export(other, backbone_weights(1), CONFIG)
    cache = tmp_path / "hub-cache"
    populate_hub_cache(cache, "someone/intl-r18", {"main": ("a" * 40, export), "v1": ("b" * 40, other),
                                                   "refs/pr/1": ("c" * 40, other)})
    assert [r.repo_id for r in huggingface_hub.scan_cache_dir(cache).repos] == ["someone/intl-r18"]
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from intl import load_backbone
from safetensors.torch import save_file
for name, revision in (("main", None), ("v1", "v1"), ("pr", "refs/pr/1")):
    backbone, config = load_backbone("someone/intl-r18", revision=revision)
    save_file(backbone.state_dict(), {str(tmp_path)!r} + f"/{{name}}.safetensors")
    print(name, config["hub_repo"], config["image_size"])
try:
    load_backbone("someone/not-cached")
except ValueError as error:
    print("error:", error)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == ["main someone/intl-r18 16", "v1 someone/intl-r18@v1 16", "pr someone/intl-r18@refs/pr/1 16"]
    assert_same_weights(load_file(tmp_path / "main.safetensors"), load_file(export / "model.safetensors"))
    for name in ("v1", "pr"):
        assert_same_weights(load_file(tmp_path / f"{name}.safetensors"), load_file(other / "model.safetensors"))
    assert lines[3].startswith("error: Hub model someone/not-cached: offline mode is on (HF_HUB_OFFLINE)")


def test_a_hub_id_and_its_revision_go_to_huggingface_hub(export, monkeypatch):
    asked = []

    def hf_hub_download(repo_id, filename, revision=None):
        asked.append((repo_id, filename, revision))
        return str(export / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    backbone, config = load_backbone("someone/intl-r18", revision="v1")
    assert asked == [("someone/intl-r18", "model.safetensors", "v1"), ("someone/intl-r18", "config.json", "v1")]
    assert config["hub_repo"] == "someone/intl-r18@v1"
    assert_same_weights(backbone.state_dict(), load_file(export / "model.safetensors"))


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace the network calls of a push; upload_folder records exactly what it was given."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):  # as the Hub's: only the files that allow_patterns names
        folder, allowed = Path(kwargs["folder_path"]), kwargs.get("allow_patterns") or ["*"]
        files = {p.name: p.read_bytes() for p in folder.iterdir() if any(fnmatch.fnmatch(p.name, a) for a in allowed)}
        calls.append(("upload_folder", kwargs["repo_id"], {**kwargs, "files": files}))
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self: {"name": "me"})
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_exactly_the_weights_config_and_a_model_card(export, fake_hub, tmp_path):
    export = export_backbone_from(export, tmp_path / "carded", repo_id="me/intl-r18")
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    assert push_export_to_hub(export, "me/intl-r18", private=True) == "commit-info"
    (_, repo, create), (_, _, upload) = fake_hub
    assert repo == "me/intl-r18" and create["private"] is True
    assert upload.get("revision") is None and upload["repo_type"] == "model"
    assert sorted(upload["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert upload["files"]["model.safetensors"] == (export / "model.safetensors").read_bytes()
    assert upload["files"]["config.json"] == (export / "config.json").read_bytes()
    assert 'hf_hub_download("me/intl-r18", "model.safetensors")' in upload["files"]["README.md"].decode()
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before  # the export folder is left as it was
    (export / "junk.txt").write_text("not for the Hub")
    push_export_to_hub(export, "me/intl-r18")
    assert "junk.txt" not in fake_hub[-1][2]["files"]


def test_model_card_has_hub_metadata_results_citations_and_a_working_torchvision_snippet(export, tmp_path):
    result = {"protocol": "linear", "dataset": "uoft-cs/cifar10", "test_split": "test",
              "rows": [{"name": "linear (ImageNet protocol)", "top1": 91.234, "top5": 99.5}]}
    (tmp_path / "linear.json").write_text(json.dumps(result))
    knn = {"protocol": "knn", "dataset": "uoft-cs/cifar10", "test_split": "test",
           "rows": [{"name": "5-NN (euclidean)", "top1": 88.0, "top5": None}]}
    carded = export_backbone_from(export, tmp_path / "carded", results=[tmp_path / "linear.json", knn], repo_id="me/m")
    card = huggingface_hub.ModelCard.load(carded / "README.md")
    data = card.data
    assert data.library_name == "pytorch" and data.pipeline_tag == "image-feature-extraction"
    assert {"self-supervised", "intl", "image-feature-extraction"} <= set(data.tags)
    assert data.datasets == ["uoft-cs/cifar10"]
    metrics = {r.metric_name: r.metric_value for r in data.eval_results}
    assert metrics == {"linear (ImageNet protocol) top-1 accuracy (%)": 91.23,
                       "linear (ImageNet protocol) top-5 accuracy (%)": 99.5, "5-NN (euclidean) top-1 accuracy (%)": 88.0}
    assert all(r.dataset_type == "uoft-cs/cifar10" and r.dataset_split == "test" for r in data.eval_results)
    assert "@inproceedings{weng2024modulate" in card.text and "@inproceedings{weng2022investigation" in card.text
    assert "IterNorm" in card.text and "`config.json` holds the recipe" in card.text
    assert "| linear (ImageNet protocol) | uoft-cs/cifar10 (test) | 91.23 | 99.50 |" in card.text
    assert "| 5-NN (euclidean) | uoft-cs/cifar10 (test) | 88.00 | - |" in card.text
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    namespace = {}
    exec(snippet.replace("from huggingface_hub import hf_hub_download", "")
         .replace("import torch, torchvision", "import torch, torchvision\n"
                  f"hf_hub_download = lambda repo, name: {str(export)!r} + '/' + name"), namespace)
    assert_same_weights({k: v for k, v in namespace["net"].state_dict().items() if not k.startswith("fc.")},
                        load_file(export / "model.safetensors"))
    # Without results: metadata without a model-index.
    card = huggingface_hub.ModelCard.load(export_backbone_from(export, tmp_path / "bare") / "README.md")
    assert card.data.eval_results is None and "OWNER/NAME" in card.text


def test_export_command_converts_an_official_checkpoint_and_pushes_it(tmp_path, fake_hub, capsys):
    checkpoint = official_checkpoint(tmp_path / "intl.pth.tar", backbone_weights(2), arch="resnet18")
    out = main_export(["--source", str(checkpoint), "--output_dir", str(tmp_path / "export"),
                       "--push_to_hub", "me/intl-official", "--private"])
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    upload = fake_hub[-1][2]
    assert upload["files"]["README.md"] == (out / "README.md").read_bytes()
    assert fake_hub[0][2]["private"] is True
    assert "pushed" in capsys.readouterr().out


def test_export_refuses_a_folder_that_is_not_an_export_even_with_overwrite(export, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.jsonl").write_text("{}")
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(ValueError, match="holds log.jsonl; an export replaces the whole folder"):
            main_export(["--source", str(export), "--output_dir", str(tmp_path / "run"), *overwrite])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["log.jsonl"]


def test_an_export_writes_weights_config_and_card_together_or_leaves_the_previous_one_untouched(export, tmp_path,
                                                                                                monkeypatch):
    copy = export_backbone_from(export, tmp_path / "copy")
    assert sorted(p.name for p in copy.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    with pytest.raises(ValueError, match="missing.json is missing"):
        export_backbone_from(export, copy, results=[tmp_path / "missing.json"])
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(intl, "save_file", disk_full)  # a full disk while the new export is written
    with pytest.raises(OSError, match="No space left"):
        export_backbone_from(export, copy)
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "export"]  # no temporary folder left behind


# ----------------------------------------------------------------------------- nothing lost, nothing silently wrong


def nan_in(weights, key):
    weights = {k: v.clone() for k, v in weights.items()}
    weights[key].view(-1)[3] = float("nan")
    weights[key].view(-1)[4] = float("inf")
    return weights


@pytest.mark.parametrize("kind", ["export folder", ".safetensors file", "official .pth.tar", "pretrain checkpoint"])
def test_non_finite_weights_are_refused_at_load_naming_the_tensor(tmp_path, kind):
    weights = nan_in(backbone_weights(0), "layer2.0.conv1.weight")
    if kind == "export folder":
        source = tmp_path / "export"
        write_export(source, weights, CONFIG)
    elif kind == ".safetensors file":
        save_file(weights, tmp_path / "weights.safetensors")
        source = tmp_path / "weights.safetensors"
    elif kind == "official .pth.tar":
        source = official_checkpoint(tmp_path / "intl.pth.tar", weights)
    else:
        source = tmp_path / "checkpoints" / "step-00000010"
        source.mkdir(parents=True)
        save_file({f"backbone.{k}": v for k, v in weights.items()}, source / "model.safetensors")
        (source / "trainer_state.json").write_text(json.dumps({"step": 10, "config": {}, "backbone": CONFIG}))
    with pytest.raises(ValueError, match=rf"^the weights of {re.escape(str(source))}: tensor 'layer2.0.conv1.weight' "
                                         r"holds 2 NaN / Inf value\(s\): these weights are broken"):
        load_backbone(source) if kind in ("export folder", "pretrain checkpoint") else converted(source)


@pytest.mark.parametrize("damage, message", [
    pytest.param({"config.json": '{"arch": "resnet18",'}, r"config.json is not valid JSON \(Expecting property name "
                 r"enclosed in double quotes: line 1 column 21", id="invalid JSON in config.json"),
    pytest.param({"config.json": '{"arch": "resnet18", "image_size": "big"}'},
                 r"config.json: image_size is 'big', must be an integer", id="image_size 'big'"),
    pytest.param({"config.json": '{"std": [0.2, 0, 0.2]}'},
                 r"config.json: std is \[0.2, 0, 0.2\], each value must be in \(0, inf\)", id="a zero std"),
    pytest.param({"config.json": "[1, 2]"}, "config.json is not a JSON object", id="a list as config.json"),
    pytest.param({"model.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{}"},
                 "model.safetensors could not be read: SafetensorError",
                 id="a damaged model.safetensors"),
])
def test_a_damaged_export_is_refused_naming_the_file_and_what_is_wrong(export, damage, message):
    for name, content in damage.items():
        (export / name).write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ValueError, match=message):
        load_backbone(export)


@pytest.mark.parametrize("content, message", [
    pytest.param(bytes(range(256)) * 8, "could not be read: ", id="random bytes"),
    pytest.param(b"\x80\x02" + bytes(range(100)), "could not be read: ", id="random bytes after a pickle mark"),
    pytest.param("truncated", "could not be read: RuntimeError", id="a truncated checkpoint"),
])
def test_a_file_that_is_no_checkpoint_is_refused_as_such_without_suggesting_weights_only_false(
        tmp_path, content, message):
    path = tmp_path / "intl.pth.tar"
    if content == "truncated":
        data = official_checkpoint(path, backbone_weights(0)).read_bytes()
        content = data[:len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        converted(path)
    assert str(info.value).startswith(f"{path} {message}") and "weights_only=False" not in str(info.value)


def test_export_command_replaces_an_existing_export_only_with_overwrite(export, tmp_path):
    argv = ["--source", str(export), "--output_dir", str(tmp_path / "out")]
    main_export(argv)
    before = (tmp_path / "out" / "config.json").read_text()
    other = tmp_path / "other"
    write_export(other, backbone_weights(5), {**CONFIG, "image_size": 24})
    with pytest.raises(ValueError, match="holds README.md, config.json, model.safetensors; an export replaces the "
                                         "whole folder: give a new folder, or add --overwrite"):
        main_export(["--source", str(other), "--output_dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "config.json").read_text() == before
    main_export(["--source", str(other), "--output_dir", str(tmp_path / "out"), "--overwrite"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["image_size"] == 24
    # The way to push an export again (README): the export is its own source, read before --overwrite removes it.
    main_export(["--source", str(tmp_path / "out"), "--output_dir", str(tmp_path / "out"), "--overwrite"])
    assert_same_weights(load_file(tmp_path / "out" / "model.safetensors"), backbone_weights(5))


# ----------------------------------------------------------------------------- on the Hub like a native


def test_a_cifar_stem_export_shows_its_stem_in_the_torchvision_snippet(tmp_path):
    write_export(tmp_path / "cifar", backbone_weights(0, stem="cifar"), {**CONFIG, "stem": "cifar"})
    card = huggingface_hub.ModelCard.load(export_backbone_from(tmp_path / "cifar", tmp_path / "out") / "README.md")
    assert "net.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3" in card.text


def test_a_card_names_no_local_path_the_split_used_and_says_when_no_license_was_chosen(tiny_finished_run, tmp_path):
    # conftest's run of `pretrain.py --dataset ROOT/my-private-photos --output_dir ROOT/run` (test_pretrain's tiny run)
    export = export_backbone_from(tiny_finished_run.run / "backbone", tmp_path / "published")
    for text in ((export / "config.json").read_text(), (export / "README.md").read_text()):
        assert str(tiny_finished_run.root) not in text
    config = json.loads((export / "config.json").read_text())
    assert config["dataset"] == "my-private-photos" and config["dataset_is_local_folder"] is True
    assert config["split"] == "train"
    card = huggingface_hub.ModelCard.load(export / "README.md")
    assert card.data.license is None and card.data.datasets is None  # the Hub's "other" needs a name and a link
    assert "No license was chosen for these weights by their publisher." in card.text
    assert card.data.eval_results is None  # a local folder is no model-index dataset type
    assert "From a clone of the INTL repository" in card.text
    assert "T.Resize(8, interpolation=T.InterpolationMode.BILINEAR" in card.text and "T.Normalize(" in card.text
    licensed = export_backbone_from(export, tmp_path / "licensed", license="apache-2.0")
    assert huggingface_hub.ModelCard.load(licensed / "README.md").data.license == "apache-2.0"


def test_a_refused_push_ends_in_one_line_with_the_librarys_words_and_keeps_the_export(export, tmp_path, monkeypatch):
    def no_token(self, *args, **kwargs):
        raise huggingface_hub.errors.LocalTokenNotFoundError("Token is required, but no token found")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_token)
    with pytest.raises(SystemExit) as info:
        intl.run(main_export, ["--source", str(export), "--output_dir", str(tmp_path / "out"), "--push_to_hub", "me/m"])
    assert info.value.code == "error: Token is required, but no token found"  # one line, exit status 1
    intl.load_backbone(tmp_path / "out")  # the export is written: pushing it again takes seconds
