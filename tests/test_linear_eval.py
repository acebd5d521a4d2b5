"""linear_eval.py: each protocol on small data, the offline digits default, resume, 2 processes, bad input."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import intl
import linear_eval
from intl import load_backbone

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run(script, *args, env=None, check=True, launcher=None):
    command = (launcher or [sys.executable]) + [str(ROOT / script), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, **OFFLINE, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed:\n{result.stdout}\n{result.stderr}")
    return result


def evaluate(*args):
    """linear_eval in this process (no start-up cost); returns {protocol: record}."""
    argv = [str(a) for a in args]
    linear_eval.main(argv + ["--num_workers", "0"])
    output_dir = Path(argv[argv.index("--output_dir") + 1])
    return {p.stem: json.loads(p.read_text()) for p in output_dir.glob("*.json")}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A ResNet-18 pretrained for 2 epochs on digits at 16 px: OUTPUT_DIR with backbone/, checkpoints/, log.jsonl."""
    output_dir = tmp_path_factory.mktemp("pretrain")
    run("pretrain.py", "--output_dir", output_dir, "--image_size", "16", "--batch_size", "128",
        "--projector", "64-64-64", "--num_workers", "0", "--epochs", "2", "--knn_every", "2")
    return output_dir


@pytest.fixture(scope="module")
def initial(pretrained, tmp_path_factory):
    """The same network at initialisation: pretrain.py builds its backbone right after seeding with 0."""
    export = tmp_path_factory.mktemp("init") / "backbone"
    config = json.loads((pretrained / "backbone" / "config.json").read_text())
    torch.manual_seed(0)
    intl.write_export(export, intl.build_backbone("resnet18", False).state_dict(), {**config, "epochs_trained": 0})
    return export


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ROOT/{train,test}/class_c/*.png, 20 x 20: 3 classes, 8 training images each, 4 + 4 + 3 test images.

    Each class has its own mean colour, so a classifier can learn something from a few images.
    """
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(0)
    for split, counts in (("train", (8, 8, 8)), ("test", (4, 4, 3))):
        for c, count in enumerate(counts):
            (root / split / f"class_{c}").mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 120, (20, 20, 3), generator=generator)
                pixels[..., c] += 120
                Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / split / f"class_{c}" / f"{split}_{c}_{i}.png")
    return root


TINY = ["--epochs", "3", "--batch_size", "8", "--lr", "0.05", "--eval_batch_size", "4"]


def test_default_run_is_offline_on_digits_fast_and_pretraining_beats_initialisation(pretrained, initial, tmp_path):
    tic = time.time()
    result = run("linear_eval.py", "--backbone", pretrained / "backbone")
    seconds = time.time() - tic
    assert seconds < 60
    records = {p: json.loads((pretrained / "eval" / "backbone" / f"{p}.json").read_text())
               for p in ("knn", "linear-cached")}
    knn, cached = records["knn"], records["linear-cached"]
    assert knn["rows"][0]["name"] == "5-NN (euclidean)" and knn["n_test"] == 360 and knn["n_train"] == 1437
    assert cached["final_epoch"] == 500 and cached["settings"]["batch_size"] == 1000
    assert cached["rows"][0]["top1"] == cached["history"][-1]["top1"]  # the final epoch, not the best
    assert cached["best_epoch_extra"]["note"].startswith("chosen on the test split")
    assert 0 < cached["rows"][0]["top1"] <= cached["rows"][0]["top5"] <= 100
    assert "5-NN (euclidean)" in result.stdout + result.stderr and "final epoch" in result.stdout + result.stderr
    # The same 5-NN as pretrain.py's online monitor at its last step.
    log = [json.loads(line) for line in (pretrained / "log.jsonl").read_text().splitlines()]
    assert knn["rows"][0]["top1"] == pytest.approx([r["knn_top1"] for r in log if "knn_top1" in r][-1], abs=0.3)

    at_init = evaluate("--backbone", initial, "--protocol", "knn", "--output_dir", tmp_path)["knn"]
    assert knn["rows"][0]["top1"] > at_init["rows"][0]["top1"]


def test_pretrain_checkpoint_folder_loads_the_same_weights_as_its_export(pretrained):
    checkpoint = sorted((pretrained / "checkpoints").glob("step-*"))[-1]
    from_checkpoint, config = load_backbone(checkpoint)
    exported = load_file(pretrained / "backbone" / "model.safetensors")
    state = from_checkpoint.state_dict()
    assert state.keys() == exported.keys() and all(torch.equal(state[k], exported[k]) for k in exported)
    assert config["arch"] == "resnet18" and config["image_size"] == 16 and config["epochs_trained"] == 2


def test_linear_protocol_steps_the_lr_reports_the_final_epoch_and_keeps_the_backbone_bit_identical(
        pretrained, folder, tmp_path):
    record = evaluate("--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "linear",
                      "--output_dir", tmp_path, *TINY, "--epochs", "5")["linear"]
    assert record["backbone_unchanged"] is True
    history = record["history"]
    # batch 8 on 1 process: lr 0.05 x 8 / 256, x0.1 from epoch 3 (0.6 x 5) and again from epoch 4 (0.8 x 5)
    assert [h["lr_head"] for h in history] == pytest.approx([0.05 * 8 / 256 * f for f in (1, 1, 1, 0.1, 0.01)])
    assert record["final_epoch"] == 5 and record["rows"][0]["top1"] == history[-1]["top1"]
    assert all(h["n_evaluated"] == 11 for h in history) and record["n_test"] == 11
    assert record["num_classes"] == 3


def test_backbone_check_catches_bn_statistics_updated_by_a_backbone_left_in_train_mode(
        pretrained, folder, tmp_path, monkeypatch):
    monkeypatch.setattr(linear_eval, "freeze", lambda backbone: backbone.requires_grad_(False).train())
    with pytest.raises(linear_eval.BackboneChanged, match="running_mean|running_var|num_batches_tracked"):
        evaluate("--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "linear",
                 "--output_dir", tmp_path, *TINY, "--epochs", "1")


def test_interrupted_linear_evaluation_resumes_to_the_uninterrupted_result(pretrained, folder, tmp_path):
    common = ["--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "linear", *TINY]
    whole = evaluate(*common, "--output_dir", tmp_path / "whole")["linear"]
    assert evaluate(*common, "--output_dir", tmp_path / "parts", "--stop_after_epochs", "1") == {}
    assert [p.name for p in (tmp_path / "parts" / "checkpoints" / "linear").iterdir()] == ["epoch-0001"]
    with pytest.raises(ValueError, match="lr is 0.1 now but 0.05"):
        evaluate(*common, "--output_dir", tmp_path / "parts", "--resume", "--lr", "0.1")
    resumed = evaluate(*common, "--output_dir", tmp_path / "parts", "--resume")["linear"]
    assert len(resumed["history"]) == 3
    for a, b in zip(whole["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5) and a["top1"] == b["top1"]


def test_finetune_learns_from_a_seeded_class_balanced_subset_or_the_named_images(pretrained, folder, tmp_path):
    split = intl.load_image_split(folder, "train")
    args = linear_eval.resolve_args(["--backbone", "x", "--protocol", "finetune", "--train_fraction", "0.25"])
    subset = linear_eval.training_subset(split, 3, args)
    assert intl.labels_of(subset).bincount().tolist() == [2, 2, 2]
    assert linear_eval.image_file_names(subset) == linear_eval.image_file_names(
        linear_eval.training_subset(split, 3, args))  # same seed, same images
    args.seed = 1
    assert linear_eval.image_file_names(subset) != linear_eval.image_file_names(
        linear_eval.training_subset(split, 3, args))

    names = tmp_path / "subset.txt"
    names.write_text("train_0_3.png\ntrain_2_5.png\n")
    record = evaluate("--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "finetune",
                      "--subset_file", names, "--output_dir", tmp_path / "out", *TINY, "--epochs", "2")["finetune"]
    assert record["n_train"] == 24 and record["settings"]["n_train"] == 2  # the split, the subset
    assert record["rows"][0]["name"] == "fine-tune on 2 images"
    # One step per epoch: the cosine is at its peak for epoch 1 and half-way for epoch 2.
    assert [h["lr_head"] for h in record["history"]] == pytest.approx([0.05 * 8 / 256, 0.05 * 8 / 256 / 2])
    names.write_text("train_0_3.png\nnot_there.png\n")
    with pytest.raises(ValueError, match="1 of its 2 images are not in .* 'not_there.png'"):
        evaluate("--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "finetune",
                 "--subset_file", names, "--output_dir", tmp_path / "out2", *TINY)


def test_weighted_cosine_knn_votes_by_similarity_and_reports_top5():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.1]])
    result = linear_eval.weighted_cosine_knn(train, labels, test, torch.tensor([0, 1, 2]), k=5, temperature=0.07)
    assert result == {"top1": 100.0, "top5": 100.0}
    # All 5 neighbours vote, but exp(sim / T) lets the nearest decide: the third query, labelled 1 here,
    # gets class 2 although 2 of its 5 neighbours are class 1.
    result = linear_eval.weighted_cosine_knn(train, labels, test, torch.tensor([0, 1, 1]), k=5, temperature=0.07)
    assert result["top1"] == pytest.approx(200 / 3) and result["top5"] == 100.0


def test_knn_cosine_option_reports_k_20_and_200_or_as_many_as_there_are_training_images(pretrained, folder, tmp_path):
    record = evaluate("--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "knn",
                      "--knn_metric", "cosine", "--output_dir", tmp_path)["knn"]
    # 24 training images: k = 200 votes with all of them, and its row says so.
    assert [r["name"] for r in record["rows"]] == ["20-NN (cosine, T=0.07)", "24-NN (cosine, T=0.07)"]
    features = {split: (torch.randn(n, 8), torch.arange(n) % 3) for split, n in (("train", 24), ("test", 11))}
    args = linear_eval.resolve_args(["--knn_metric", "cosine", "--backbone", "x"])
    expected = [linear_eval.weighted_cosine_knn(*features["train"], *features["test"], k, 0.07) for k in (20, 24)]
    assert [{"top1": r["top1"], "top5": r["top5"]} for r in linear_eval.run_knn(features, args)["rows"]] == expected


def test_cached_linear_lr_decays_exponentially_from_1e2_to_1e6_over_the_epochs():
    lrs = [linear_eval.cached_lr(e, 500, 1e-2, 1e-6) for e in range(500)]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-6)
    ratios = torch.tensor(lrs[1:]) / torch.tensor(lrs[:-1])
    assert torch.allclose(ratios, torch.full_like(ratios, 1e-4 ** (1 / 499)))


def test_two_processes_evaluate_every_test_image_exactly_once(pretrained, folder, tmp_path):
    # 11 test images, batches of 4 on each of 2 processes: 11 is not a multiple of 8.
    common = ["--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "knn", "linear", *TINY]
    result = run("linear_eval.py", *common, "--output_dir", tmp_path / "two", "--num_workers", "0",
                 env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
                 launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    assert "2 process(es)" in result.stdout + result.stderr
    two = {p: json.loads((tmp_path / "two" / f"{p}.json").read_text()) for p in ("knn", "linear")}
    assert two["linear"]["processes"] == 2 and [r["n_evaluated"] for r in two["linear"]["history"]] == [11, 11, 11]
    assert two["knn"]["n_evaluated"] == 11
    one = evaluate(*common, "--output_dir", tmp_path / "one")
    assert two["knn"]["rows"] == one["knn"]["rows"]  # every feature exactly once, none twice


def test_missing_backbone_gives_one_error_line_and_a_nonzero_exit(tmp_path):
    result = run("linear_eval.py", "--backbone", tmp_path / "nothing", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: backbone")
    assert "not found" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def unlabelled(tmp_path):
    import datasets
    from PIL import Image

    image = Image.new("RGB", (8, 8))
    dataset = datasets.Dataset.from_dict({"image": [image] * 4}, features=datasets.Features({"image": datasets.Image()}))
    datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(tmp_path / "unlabelled")
    return tmp_path / "unlabelled"


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet50"], "do not fit .* missing key.*'layer1.0.conv3.weight'"),
    (["--dataset", "{unlabelled}"], "has no labels"),
    (["--protocol", "finetune"], "exactly one of --train_fraction"),
    (["--protocol", "linear", "--resume"], "no checkpoint in"),
    (["--k", "0"], "at least 1"),
])
def test_bad_input_is_a_value_error_with_a_clear_message(pretrained, unlabelled, tmp_path, args, message):
    # The __main__ block turns these into one `error: ...` line (checked above for a missing backbone).
    args = [a.replace("{unlabelled}", str(unlabelled)) for a in args]
    with pytest.raises(ValueError, match=message):
        evaluate("--backbone", pretrained / "backbone", "--output_dir", tmp_path, *args)


def test_every_flag_has_help():
    assert all(action.help for action in linear_eval.get_parser()._actions)


# ----------------------------------------------------------------------------- nothing lost, nothing silently wrong


def small_export(path, seed, **config):
    torch.manual_seed(seed)
    return intl.write_export(path, intl.build_backbone("resnet18", False).state_dict(),
                             {"arch": "resnet18", "cifar_stem": False, "image_size": 16, **config})


def test_default_output_folders_are_one_per_backbone_so_two_backbones_in_one_folder_keep_their_results(folder, tmp_path):
    for name, seed in (("backbone-a", 1), ("backbone-b", 2)):
        small_export(tmp_path / "models" / name, seed)
        linear_eval.main(["--backbone", str(tmp_path / "models" / name), "--dataset", str(folder), "--protocol", "knn",
                          "--num_workers", "0"])
    records = {name: json.loads((tmp_path / "models" / "eval" / name / "knn.json").read_text())
               for name in ("backbone-a", "backbone-b")}
    assert {r["backbone"] for r in records.values()} == {str(tmp_path / "models" / n) for n in records}
    # Every kind of backbone gets its own folder: a checkpoint's in its run, a Hub id's per revision.
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000010"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    assert linear_eval.default_output_dir(str(checkpoint)) == tmp_path / "run" / "eval" / "step-00000010"
    hub = {linear_eval.default_output_dir("me/intl"), linear_eval.default_output_dir("me/intl@v1"),
           linear_eval.default_output_dir("me/intl", revision="v2")}
    assert len(hub) == 3 and linear_eval.default_output_dir("me/intl", "v1") in hub


def test_results_of_an_earlier_evaluation_are_replaced_only_with_overwrite(folder, tmp_path):
    small_export(tmp_path / "backbone", 0)
    common = ["--backbone", tmp_path / "backbone", "--dataset", folder, "--output_dir", tmp_path / "out"]
    evaluate(*common, "--protocol", "knn")
    before = (tmp_path / "out" / "knn.json").read_text()
    with pytest.raises(ValueError, match=f"--output_dir {tmp_path / 'out'} already holds knn.json of an earlier run, "
                                         "which this command would replace: give another --output_dir, or add "
                                         "--overwrite to replace it"):
        evaluate(*common, "--protocol", "knn", "linear-cached", "--epochs", "2")
    assert (tmp_path / "out" / "knn.json").read_text() == before and not (tmp_path / "out" / "linear-cached.json").exists()
    records = evaluate(*common, "--protocol", "knn", "linear-cached", "--epochs", "2", "--overwrite")
    assert set(records) == {"knn", "linear-cached"}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["knn.json", "linear-cached.json"]  # no temp files


def test_a_backbone_with_non_finite_weights_is_refused_naming_the_tensor(folder, tmp_path):
    torch.manual_seed(0)
    weights = intl.build_backbone("resnet18", False).state_dict()
    weights["layer3.1.bn2.running_var"][5] = float("nan")
    intl.write_export(tmp_path / "diverged", weights, {"arch": "resnet18", "cifar_stem": False, "image_size": 16})
    with pytest.raises(ValueError, match=r"tensor 'layer3.1.bn2.running_var' holds 1 NaN / Inf value\(s\)"):
        evaluate("--backbone", tmp_path / "diverged", "--dataset", folder, "--protocol", "knn", "--output_dir", tmp_path)


def test_a_trained_protocol_removes_what_interrupted_saves_left(pretrained, folder, tmp_path, capsys):
    common = ["--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "linear", *TINY,
              "--epochs", "2", "--output_dir", tmp_path]
    evaluate(*common, "--stop_after_epochs", "1")
    leftover = tmp_path / "checkpoints" / "linear" / ".tmp-epoch-0009"  # an epoch this run never saves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a save")
    evaluate(*common, "--resume")
    assert not leftover.exists() and f"removed {leftover}, left by an interrupted save" in capsys.readouterr().out


def test_ctrl_c_in_a_trained_protocol_says_the_epoch_and_how_to_continue(pretrained, folder, tmp_path, monkeypatch):
    common = ["--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "linear", *TINY,
              "--epochs", "2", "--output_dir", tmp_path]
    save_epoch = linear_eval.save_epoch

    def ctrl_c_in_epoch_2(root, epoch, *args):
        if epoch == 2:
            raise KeyboardInterrupt
        save_epoch(root, epoch, *args)

    monkeypatch.setattr(linear_eval, "save_epoch", ctrl_c_in_epoch_2)
    with pytest.raises(KeyboardInterrupt) as info:
        evaluate(*common)
    assert isinstance(info.value, intl.Interrupted)
    assert str(info.value) == "interrupted in epoch 2 of linear; continue with --resume (from the end of epoch 1)"
    monkeypatch.setattr(linear_eval, "save_epoch", save_epoch)
    assert evaluate(*common, "--resume")["linear"]["final_epoch"] == 2  # and it does continue
