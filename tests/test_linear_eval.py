"""linear_eval.py: each protocol on small data, the offline digits default, resume, 2 processes, bad input."""

import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import intl
from conftest import write_export
import linear_eval
from intl import load_backbone

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run(script, *args, env=None, check=True, launcher=None):
    command = (launcher or [sys.executable]) + [str(ROOT / script), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", **(env or {})})
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
def pretrained(tiny_finished_run):
    """A ResNet-18 pretrained in this process for 1 epoch (4 steps) at 8 px on 16 generated images, saved every 2
    steps: OUTPUT_DIR with backbone/, checkpoints/ (steps 2 and 4), log.jsonl. It is conftest's tiny_finished_run,
    which test_pretrain and test_hub read too: the tests here only read it. (The digits run of the README: conftest's
    digits_run.)"""
    return tiny_finished_run.run


@pytest.fixture(scope="module")
def initial(digits_run, tmp_path_factory):
    """The digits run's network at initialisation: pretrain.py builds its backbone right after seeding with 0."""
    export = tmp_path_factory.mktemp("init") / "backbone"
    config = json.loads((digits_run[0] / "backbone" / "config.json").read_text())
    torch.manual_seed(0)
    write_export(export, intl.build_backbone("resnet18", "imagenet").state_dict(), {**config, "epochs_trained": 0})
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


@pytest.mark.slow
def test_default_run_is_offline_on_digits_and_pretraining_beats_initialisation(digits_run, initial, tmp_path):
    pretrained = digits_run[0]
    result = run("linear_eval.py", "--backbone", pretrained / "backbone")
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
    assert knn["rows"][0]["top1"] > at_init["rows"][0]["top1"] + 5  # 53% -> 67-75% (conftest's DIGITS_RUN)


def test_pretrain_checkpoint_folder_loads_the_same_weights_as_its_export(pretrained):
    checkpoints = sorted((pretrained / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000002", "step-00000004"]  # the export is the last one's
    checkpoint = checkpoints[-1]
    from_checkpoint, config = load_backbone(checkpoint)
    exported = load_file(pretrained / "backbone" / "model.safetensors")
    state = from_checkpoint.state_dict()
    assert state.keys() == exported.keys() and all(torch.equal(state[k], exported[k]) for k in exported)
    assert config["arch"] == "resnet18" and config["image_size"] == 8 and config["epochs_trained"] == 1


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
    with pytest.raises(ValueError, match="the frozen backbone changed during linear evaluation .*(running_mean|"
                                         "running_var|num_batches_tracked)"):
        evaluate("--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "linear",
                 "--output_dir", tmp_path, *TINY, "--epochs", "1")


@pytest.mark.slow
def test_interrupted_linear_evaluation_resumes_to_the_uninterrupted_result(pretrained, folder, tmp_path):
    common = ["--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "linear", *TINY]
    whole = evaluate(*common, "--output_dir", tmp_path / "whole")["linear"]
    assert evaluate(*common, "--output_dir", tmp_path / "parts", "--stop_after_epochs", "1") == {}
    assert [p.name for p in (tmp_path / "parts" / "checkpoints" / "linear").iterdir()] == ["epoch-0001"]
    checkpoint = tmp_path / "parts" / "checkpoints" / "linear" / "epoch-0001"
    with pytest.raises(ValueError, match="lr is 0.1 now but 0.05"):
        evaluate(*common, "--output_dir", tmp_path / "parts", "--resume", "latest", "--lr", "0.1")
    resumed = evaluate(*common, "--output_dir", tmp_path / "parts", "--resume", checkpoint)["linear"]
    assert len(resumed["history"]) == 3
    for a, b in zip(whole["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5) and a["top1"] == b["top1"]


@pytest.mark.slow
def test_finetune_learns_from_the_images_named_in_the_subset_file(pretrained, folder, tmp_path):
    names = tmp_path / "subset.txt"
    names.write_text("train_0_3.png\ntrain_2_5.png\n")
    record = evaluate("--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "finetune",
                      "--subset_file", names, "--output_dir", tmp_path / "out", *TINY, "--epochs", "2")["finetune"]
    assert record["n_train"] == 24 and record["settings"]["n_train"] == 2  # the split, the subset
    assert record["rows"][0]["name"] == "fine-tune on 2 images"
    names.write_text("train_0_3.png\nnot_there.png\n")
    with pytest.raises(ValueError, match="1 of its 2 images are not in .* 'not_there.png'"):
        evaluate("--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "finetune",
                 "--subset_file", names, "--output_dir", tmp_path / "out2", *TINY)


def test_cached_linear_lr_decays_by_the_authors_exponential_lr_gamma_1e_4_to_the_1_over_500_per_epoch():
    # The authors' ExponentialLR: gamma = (1e-4) ** (1 / 500), so epoch 499 trains at 1e-2 x gamma ** 499, a little
    # above 1e-6 (until round 3 the decay reached 1e-6 exactly at epoch 499: gamma (1e-4) ** (1 / 499)).
    generator = torch.Generator().manual_seed(0)
    features = {name: (torch.randn(n, 4, generator=generator), torch.arange(n) % 3) for name, n in (("train", 12),
                                                                                                     ("test", 6))}
    config = linear_eval.resolve_args(["--backbone", "x", "--protocol", "linear-cached"])
    config.recipe = None
    accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=False)
    history = linear_eval.run_linear_cached(features, 3, config, accelerator)["history"]
    gamma = 1e-4 ** (1 / 500)
    assert len(history) == 500 and history[0]["lr"] == 1e-2
    assert history[1]["lr"] == pytest.approx(1e-2 * gamma, rel=1e-12)
    assert history[499]["lr"] == pytest.approx(1e-2 * gamma ** 499, rel=1e-12)
    assert history[499]["lr"] != pytest.approx(1e-6, rel=1e-4)


@pytest.mark.slow
def test_two_processes_evaluate_every_test_image_exactly_once(pretrained, folder, tmp_path):
    # 11 test images, batches of 4 on each of 2 processes: 11 is not a multiple of 8.
    common = ["--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "knn", "linear", *TINY]
    result = run("linear_eval.py", *common, "--output_dir", tmp_path / "two", "--num_workers", "0",
                 env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
                 launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    assert "2 process(es)" in result.stdout + result.stderr
    two = {p: json.loads((tmp_path / "two" / f"{p}.json").read_text()) for p in ("knn", "linear")}
    assert two["linear"]["processes"] == 2 and [r["n_evaluated"] for r in two["linear"]["history"]] == [11, 11, 11]
    # --batch_size 8 is the global batch (4 per process): the lr scales by 8 / 256, not by 2 x 8 / 256 (and steps
    # x0.1 twice at epoch 3 of 3: the milestones 0.6 and 0.8 of 3 epochs both round to 2).
    assert two["linear"]["settings"]["batch_size"] == 8 and two["linear"]["settings"]["batch_size_is"] == "global"
    assert [h["lr_head"] for h in two["linear"]["history"]] == pytest.approx([0.05 * 8 / 256 * f for f in (1, 1, 0.01)])
    assert two["knn"]["n_evaluated"] == 11
    one = evaluate(*common, "--output_dir", tmp_path / "one")
    assert two["knn"]["rows"] == one["knn"]["rows"]  # every feature exactly once, none twice


@pytest.mark.slow
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
    for name, labels in (("no-label", {}), ("string-labels", {"label": ["cat", "dog"] * 2})):
        dataset = datasets.Dataset.from_dict({"image": [image] * 4, **labels}).cast_column("image", datasets.Image())
        datasets.DatasetDict({"train": dataset, "test": dataset}).save_to_disk(tmp_path / "unlabelled" / name)
    return tmp_path / "unlabelled"


@pytest.mark.parametrize("args, message", [
    (["--dataset", "{unlabelled}/no-label"], "has no integer class labels"),
    (["--dataset", "{unlabelled}/string-labels"], r"has no integer class labels \(no label column, or its labels are "
                                                  r"not integer class indices\): linear evaluation needs"),
    (["--protocol", "finetune"], "--protocol finetune needs --subset_file"),
    (["--protocol", "linear", "--resume", "latest"], "--resume latest: no checkpoint in"),
    (["--protocol", "linear", "--resume", "{folder}"], "not a checkpoint folder"),
    (["--k", "0"], "--k 0: each value must be "),
    (["--protocol", "linear", "--recipe", "intl-m"], "--recipe intl-m, but the backbone records method 'intl'"),
    (["--dataset", "{folder}", "--train_split", "val", "--test_split", "val"],
     "--train_split and --test_split are both val: it would test on the training images"),
    (["--dataset", "{folder}", "--test_split", "validation"], r"has no split 'validation'; available splits: \["),
])
def test_bad_input_is_a_value_error_with_a_clear_message(pretrained, folder, tmp_path, request, args, message):
    # The __main__ block turns these into one `error: ...` line (checked above for a missing backbone).
    if any("{unlabelled}" in a for a in args):  # written only for the cases that read them
        args = [a.replace("{unlabelled}", str(request.getfixturevalue("unlabelled"))) for a in args]
    args = [a.replace("{folder}", str(folder)) for a in args]
    with pytest.raises(ValueError, match=message):
        evaluate("--backbone", pretrained / "backbone", "--output_dir", tmp_path, *args)


# ----------------------------------------------------------------------------- 5-NN (intl.knn_classify)


def test_knn_tie_between_classes_goes_to_the_smallest_class_id_not_to_the_nearer_neighbours():
    # One query at 0 and training points on a line at distances 1..6: the 5 nearest are classes 2, 2, 0, 0, 1.
    train = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    train_labels = torch.tensor([2, 2, 0, 0, 1, 2])
    query = torch.zeros(1, 1)
    # Classes 2 and 0 have two votes each: class 0 wins although class 2's neighbours are nearer.
    assert intl.knn_classify(train, train_labels, query, torch.tensor([0]), k=5)["top1"] == 100.0
    assert intl.knn_classify(train, train_labels, query, torch.tensor([2]), k=5)["top1"] == 0.0
    # A clear majority still wins over a smaller class id.
    assert intl.knn_classify(train, torch.tensor([2, 2, 2, 0, 0, 1]), query, torch.tensor([2]), k=5)["top1"] == 100.0


def separated_features(k_max, n_train=300, n_candidates=100, dim=16, num_classes=4, seed=0):
    """Clustered float64 features with a large common offset (as ReLU features have), and test queries without
    near-ties: a candidate query is kept only if the squared distances to its k_max + 1 nearest training features
    differ from each other by more than 1e-2, some 50x the float32 rounding error of ||t||^2 - 2 q.t here."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(num_classes, dim, generator=generator, dtype=torch.float64) + 10.0
    train_labels = torch.arange(n_train) % num_classes
    test_labels = torch.randint(0, num_classes, (n_candidates,), generator=generator)
    train = centres[train_labels] + 5.0 * torch.randn(n_train, dim, generator=generator, dtype=torch.float64)
    test = centres[test_labels] + 5.0 * torch.randn(n_candidates, dim, generator=generator, dtype=torch.float64)
    ranked = float64_squared_distances(train, test).sort(dim=1).values[:, :k_max + 1]
    kept = (ranked[:, 1:] - ranked[:, :-1]).min(dim=1).values > 1e-2
    assert kept.sum() >= n_candidates // 2
    return train, train_labels, test[kept], test_labels[kept]


def float64_squared_distances(train, test):
    return ((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)  # explicit differences, not ||a||^2 - 2ab + ||b||^2


def float64_knn(train, train_labels, test, k):
    """The reference: float64 distances, a full sort, majority vote with a tie going to the smallest class id."""
    nearest = float64_squared_distances(train, test).argsort(dim=1)[:, :k]
    predicted = []
    for row in nearest.tolist():
        votes = [train_labels[i].item() for i in row]
        predicted.append(max(sorted(set(votes)), key=votes.count))  # max keeps the first: the smallest class id
    return nearest, torch.tensor(predicted)


def test_knn_in_float32_blocks_finds_the_same_neighbours_and_accuracy_as_an_independent_float64_computation():
    train, train_labels, test, test_labels = separated_features(k_max=20)
    for k in (1, 5, 20):
        nearest, predicted = float64_knn(train, train_labels, test, k)
        expected_top1 = 100.0 * (predicted == test_labels).sum().item() / len(test)
        # Blocks of 7 queries x 13 training features: many blocks, a ragged last one, and k > a block for k = 20.
        found, _ = intl.nearest_neighbours(train.float(), test.float(), k=k, chunk=7, train_chunk=13)
        assert torch.equal(found, nearest)  # the same neighbours in the same order, nearest first
        for chunk, train_chunk in ((7, 13), (1024, 32768)):
            result = intl.knn_classify(train.float(), train_labels, test.float(), test_labels, k=k, chunk=chunk,
                                       train_chunk=train_chunk, device="cpu")
            assert result["top1"] == expected_top1
        assert 0 < expected_top1 < 100  # the votes are not trivial


class LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest storage that any operation creates, other than those of the given tensors (views of
    the inputs, such as a slice of the training features, allocate nothing)."""

    def __init__(self, *inputs):
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in inputs}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def test_knn_memory_is_bounded_by_its_blocks_not_by_the_training_set():
    train, train_labels = torch.randn(8000, 32), torch.randint(0, 10, (8000,))
    test, test_labels = torch.randn(100, 32), torch.randint(0, 10, (100,))
    with LargestAllocation(train, train_labels, test, test_labels) as tracked:
        intl.knn_classify(train, train_labels, test, test_labels, k=5, chunk=64, train_chunk=500)
    block_bytes = 4 * 500 * max(64, 32)  # one float32 distance block (64 x 500) or training block (500 x 32)
    assert 0 < tracked.largest <= block_bytes < train.nbytes / 4


# ----------------------------------------------------------------------------- the authors' ImageNet protocols


def export_saying(method, pretrained, tmp_path_factory):
    """The pretrained export (an INTL one), its config.json saying `method` (method and recipe.method)."""
    export = tmp_path_factory.mktemp(method) / "backbone"
    export.mkdir()
    (export / "model.safetensors").write_bytes((pretrained / "backbone" / "model.safetensors").read_bytes())
    config = json.loads((pretrained / "backbone" / "config.json").read_text())
    assert config["method"] == "intl" and config["recipe"]["method"] == "intl"
    config["method"] = config["recipe"]["method"] = method
    (export / "config.json").write_text(json.dumps(config))
    return export


@pytest.fixture(scope="module")
def intl_m_export(pretrained, tmp_path_factory):
    return export_saying("intl-m", pretrained, tmp_path_factory)


@pytest.fixture(scope="module")
def bare_weights(pretrained, tmp_path_factory):
    """The pretrained weights alone, recording no method (as an official .pth.tar), exported as the scripts read them."""
    path = tmp_path_factory.mktemp("bare") / "weights.safetensors"
    path.write_bytes((pretrained / "backbone" / "model.safetensors").read_bytes())
    return linear_eval.export_backbone_from(path, path.with_name("export"))


def test_linear_head_lr_is_0_2_for_intl_and_0_4_for_intl_m_by_the_recorded_method_or_recipe_flag(
        pretrained, intl_m_export, bare_weights, folder, tmp_path, capsys):
    common = ["--dataset", folder, "--protocol", "linear", "--epochs", "1", "--eval_batch_size", "11"]
    # The default global batch 256 leaves the lr unscaled (x 256 / 256).
    intl_m = evaluate("--backbone", intl_m_export, *common, "--output_dir", tmp_path / "m")["linear"]
    assert intl_m["settings"]["lr"] == 0.4 and intl_m["history"][0]["lr_head"] == pytest.approx(0.4)
    assert intl_m["settings"]["recipe"] == "intl-m" and intl_m["settings"]["batch_size"] == 256
    assert "linear: head lr 0.4 per 256 images of global batch; INTL-M's recipe, chosen by the backbone's " \
           "recorded method 'intl-m'" in capsys.readouterr().out
    # No recorded method (an official checkpoint): INTL's 0.2, and the run says why; --recipe decides instead.
    bare = ["--backbone", bare_weights, "--image_size", "16", *common]
    unknown = evaluate(*bare, "--output_dir", tmp_path / "bare")["linear"]
    assert unknown["settings"]["lr"] == 0.2 and unknown["history"][0]["lr_head"] == pytest.approx(0.2)
    assert "INTL's recipe, chosen by default (neither --recipe nor the backbone records a method" \
           in capsys.readouterr().out
    args = linear_eval.resolve_args(["--backbone", "x", "--protocol", "linear", "finetune", "--subset_file", "f"])
    # A recorded CW-RGP backbone gets CW-RGP's own protocol since round 3 (INTL's until then), and refuses another
    # --recipe as an INTL backbone does.
    for flag, config, recipe in ((None, {"method": "intl"}, "intl"), (None, {"recipe": {"method": "intl-m"}}, "intl-m"),
                                 ("intl-m", {}, "intl-m"), ("intl", {"method": "intl"}, "intl"),
                                 (None, {"method": "cw-rgp"}, "cw-rgp"), ("cw-rgp", {}, "cw-rgp")):
        args.recipe, args.recipe_chosen_by = linear_eval.evaluation_recipe(flag, config)
        assert args.recipe == recipe
        assert linear_eval.protocol_settings("linear", args)["lr"] == {"intl": 0.2, "intl-m": 0.4, "cw-rgp": 0.1}[recipe]
    with pytest.raises(ValueError, match="--recipe intl-m, but the backbone records method 'cw-rgp'"):
        linear_eval.evaluation_recipe("intl-m", {"method": "cw-rgp"})
    args.lr = 0.3  # an explicit --lr wins
    args.recipe, args.recipe_chosen_by = linear_eval.evaluation_recipe("intl-m", {})
    assert linear_eval.protocol_settings("linear", args)["lr"] == 0.3
    assert "--recipe" in linear_eval.get_parser().format_help()


@pytest.mark.slow
def test_finetune_keeps_a_constant_lr_head_0_2_and_backbone_0_006_for_intl_or_0_004_for_intl_m(
        pretrained, intl_m_export, folder, tmp_path):
    names = tmp_path / "subset.txt"
    names.write_text("train_0_3.png\ntrain_1_1.png\ntrain_2_5.png\n")
    common = ["--dataset", folder, "--protocol", "finetune", "--subset_file", names, "--epochs", "3",
              "--eval_batch_size", "11"]
    for backbone, lr_backbone in ((pretrained / "backbone", 0.006), (intl_m_export, 0.004)):
        record = evaluate("--backbone", backbone, *common, "--output_dir", tmp_path / str(lr_backbone))["finetune"]
        assert record["settings"]["lr"] == 0.2 and record["settings"]["lr_backbone"] == lr_backbone
        # Global batch 256: unscaled, and the same at every epoch (no cosine, no step).
        assert [h["lr_head"] for h in record["history"]] == pytest.approx([0.2] * 3)
        assert [h["lr_backbone"] for h in record["history"]] == pytest.approx([lr_backbone] * 3)
    assert all(linear_eval.lr_factor("constant", epoch, 20, [0.6, 0.8]) == 1.0 for epoch in (0, 5.5, 12, 16, 19.9))


@pytest.fixture(scope="module")
def cw_rgp_export(pretrained, tmp_path_factory):
    return export_saying("cw-rgp", pretrained, tmp_path_factory)


def test_a_cw_rgp_backbone_gets_cw_rgp_linear_protocol_larc_sgd_lr_0_4_at_batch_1024_cosine_per_epoch(
        cw_rgp_export, folder, tmp_path, capsys):
    args = linear_eval.resolve_args(["--backbone", "x", "--protocol", "linear", "--recipe", "cw-rgp"])
    args.recipe, args.recipe_chosen_by = linear_eval.evaluation_recipe("cw-rgp", {})
    settings = linear_eval.protocol_settings("linear", args)
    assert {k: settings[k] for k in ("lr", "batch_size", "epochs", "weight_decay", "schedule", "larc_trust")} == \
        dict(lr=0.1, batch_size=1024, epochs=100, weight_decay=0.0, schedule="cosine", larc_trust=0.001)
    assert "milestones" not in settings
    _, optimizer = linear_eval.model_and_optimizer(False, intl.build_backbone("resnet18", "cifar"), 10, settings)
    assert isinstance(optimizer, linear_eval.LarcSGD) and optimizer.trust == 0.001
    assert optimizer.param_groups[0]["base_lr"] == pytest.approx(0.4)  # 0.1 x 1024 / 256
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["weight_decay"] == 0
    # The recorded method picks it; cosine per epoch: lr x 0.5 (1 + cos(pi epoch / epochs)).
    record = evaluate("--backbone", cw_rgp_export, "--dataset", folder, "--protocol", "linear", "--epochs", "3",
                      "--batch_size", "8", "--eval_batch_size", "11", "--output_dir", tmp_path)["linear"]
    assert record["settings"]["recipe"] == "cw-rgp" and record["backbone_unchanged"] is True
    assert [h["lr_head"] for h in record["history"]] == pytest.approx(
        [0.1 * 8 / 256 * 0.5 * (1 + math.cos(math.pi * e / 3)) for e in range(3)])
    assert "CW-RGP's recipe, chosen by the backbone's recorded method 'cw-rgp'" in capsys.readouterr().out
    names = tmp_path / "subset.txt"
    with pytest.raises(ValueError, match="CW-RGP's authors publish no fine-tuning learning rate: give --lr_backbone"):
        evaluate("--backbone", cw_rgp_export, "--dataset", folder, "--protocol", "finetune", "--subset_file", names,
                 "--output_dir", tmp_path / "finetune")


def test_larc_scales_each_parameters_step_by_trust_norm_p_over_norm_g_as_a_float64_hand_computation():
    """Two momentum steps of LARC (clip False) around SGD against Python floats: a 2 x 2 weight, a vector, a zero
    parameter and a zero gradient (those two step with a local lr of 1)."""
    p0 = [[3.0, -4.0, 1.0, 2.0], [0.5, 0.0, -1.5], [0.0, 0.0], [2.0, 1.0]]
    grads = [[[0.3, 0.1, -0.2, 0.4], [0.02, -0.05, 0.01], [1.0, -1.0], [0.0, 0.0]],
             [[-0.1, 0.2, 0.3, 0.0], [0.04, 0.01, -0.02], [0.5, 0.5], [0.0, 0.0]]]
    shapes = [(2, 2), (3,), (2,), (2,)]
    lr, trust, momentum, wd = 0.4, 0.001, 0.9, 0.01
    params = [torch.tensor(v, dtype=torch.float64).view(shape).requires_grad_() for v, shape in zip(p0, shapes)]
    optimizer = linear_eval.LarcSGD([{"params": params}], trust, lr=lr, momentum=momentum, weight_decay=wd)
    expected, buffers = p0, [None] * len(p0)
    for step_grads in grads:
        for param, grad, shape in zip(params, step_grads, shapes):
            param.grad = torch.tensor(grad, dtype=torch.float64).view(shape)
        optimizer.step()
        after = []
        for i, (p, g) in enumerate(zip(expected, step_grads)):
            p_norm, g_norm = math.sqrt(sum(x * x for x in p)), math.sqrt(sum(x * x for x in g))
            local_lr = trust * p_norm / (g_norm + wd * p_norm) if p_norm > 0 and g_norm > 0 else 1.0
            d = [(gi + wd * pi) * local_lr for gi, pi in zip(g, p)]
            buffers[i] = d if buffers[i] is None else [momentum * b + di for b, di in zip(buffers[i], d)]
            after.append([pi - lr * b for pi, b in zip(p, buffers[i])])
        expected = after
        for param, want in zip(params, expected):
            assert param.detach().flatten().tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert optimizer.decay == wd and optimizer.param_groups[0]["weight_decay"] == 0  # joins the gradient


def test_linear_and_finetune_keep_the_last_partial_batch_and_finetune_keeps_plain_batchnorm(folder, tmp_path):
    """The authors' evaluation: drop_last False (until round 3 a partial last batch was dropped); finetune without
    SyncBatchNorm (until round 3 converted with several GPU processes)."""
    from accelerate import Accelerator

    accelerator = Accelerator()
    config = linear_eval.completed_by_backbone(linear_eval.resolve_args(
        ["--backbone", "x", "--dataset", str(folder), "--protocol", "linear", "--num_workers", "0"]),
        {"arch": "resnet18", "image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3})
    splits, _ = linear_eval.load_labelled_splits(config, accelerator)
    train_loader = accelerator.prepare(linear_eval.image_loader(splits.train, config, accelerator, 16))
    assert [len(labels) for _, labels in train_loader] == [16, 8]  # all 24 training images every epoch

    backbone = intl.build_backbone("resnet18", "cifar")
    settings = {"seed": 0, "batch_size": 256, "lr": 0.2, "lr_backbone": 0.006, "weight_decay": 0.0}
    model, optimizer = linear_eval.model_and_optimizer(True, backbone, 3, settings)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())


def test_linear_and_finetune_resize_bilinearly_as_torchvision_does_by_default():
    from PIL import Image
    from torchvision.transforms import v2

    image = Image.fromarray(torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8).numpy())
    mean, std = intl.IMAGENET_MEAN, intl.IMAGENET_STD
    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    # Evaluation: Resize 256 (short side) + CenterCrop 224, against PIL's own bilinear resize.
    resized = image.resize((341, 256), Image.Resampling.BILINEAR)  # 400 x 300 -> 341 x 256
    expected = to_tensor(resized.crop((58, 16, 282, 240)))  # the centre: round(117 / 2) = 58 px from the left
    assert torch.equal(intl.eval_transform(224, mean, std)(image), expected)
    # Training: the same random crop and flip as torchvision's defaults (bilinear) draw from the same seed.
    torch.manual_seed(3)
    ours = linear_eval.train_transform(224, mean, std)(image)
    torch.manual_seed(3)
    default = v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), to_tensor])(image)
    assert torch.equal(ours, default)


def test_every_protocol_sees_the_backbones_evaluation_resize_unless_the_input_size_is_given(tmp_path):
    """CW-RGP's STL-10 backbone records Resize(70, bicubic) + CenterCrop(64): knn, linear-cached, linear and finetune
    all evaluate on that input (`eval_images` is their one test transform); --image_size asks for another input."""
    backbone_config = {"arch": "resnet18", "image_size": 64, "mean": [0.4] * 3, "std": [0.2] * 3, "eval_resize": 70,
                       "eval_interpolation": "bicubic", "method": "cw-rgp", "dataset": "tanganke/stl10"}
    argv = ["--backbone", "unused", "--protocol", "knn", "linear", "--output_dir", str(tmp_path)]
    config = linear_eval.completed_by_backbone(linear_eval.resolve_args(argv), backbone_config)
    resize, crop = linear_eval.eval_images(config).transforms[:2]
    assert resize.size == [70] and crop.size == (64, 64)
    assert resize.interpolation == torchvision.transforms.InterpolationMode.BICUBIC
    config = linear_eval.completed_by_backbone(linear_eval.resolve_args(argv + ["--image_size", "64"]), backbone_config)
    assert linear_eval.eval_images(config).transforms[0].size == [64]


def test_print_config_shows_the_configuration_completed_by_the_backbone_and_writes_nothing(tmp_path, capsys):
    export = tmp_path / "backbone"
    write_export(export, intl.build_backbone("resnet18", "cifar").state_dict(),
                          {"arch": "resnet18", "stem": "cifar", "image_size": 32, "method": "intl-m",
                           "dataset": "uoft-cs/cifar10"})
    linear_eval.main(["--backbone", str(export), "--protocol", "linear", "--print_config"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["image_size"] == 32 and printed["mean"] == list(intl.CIFAR_MEAN) and printed["recipe"] == "intl-m"
    assert printed["dataset"] == "uoft-cs/cifar10"  # without --dataset: the one the backbone was pretrained on
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone"]  # no eval/ folder: nothing was written


@pytest.mark.parametrize("pretrained_on, message", [
    ({}, "--dataset is needed: BACKBONE names nothing as its pretraining data"),
    ({"dataset": "photos", "dataset_is_local_folder": True},
     "--dataset is needed: BACKBONE names a local folder, 'photos', as its pretraining data"),
])
def test_without_dataset_a_backbone_pretrained_on_unknown_or_local_data_asks_for_one(tmp_path, pretrained_on, message):
    export = tmp_path / "backbone"
    write_export(export, intl.build_backbone("resnet18", "cifar").state_dict(),
                          {"arch": "resnet18", "stem": "cifar", **pretrained_on})
    with pytest.raises(ValueError, match=re.escape(message.replace("BACKBONE", str(export)))):
        linear_eval.main(["--backbone", str(export), "--print_config"])
    printed = linear_eval.main(["--backbone", str(export), "--print_config", "--dataset", "digits"])
    assert printed is None  # with --dataset it goes on


def test_the_global_batch_splits_evenly_over_processes_or_is_refused():
    assert intl.per_process_batch(256, 1) == 256 and intl.per_process_batch(256, 8) == 32
    with pytest.raises(ValueError, match="--batch_size 256 is the global batch and must split evenly over the 3"):
        intl.per_process_batch(256, 3)
    help_text = {a.dest: a.help for a in linear_eval.get_parser()._actions}["batch_size"]
    assert help_text.startswith("GLOBAL training batch") and "divisible" in help_text


# ----------------------------------------------------------------------------- nothing lost, nothing silently wrong


def small_export(path, seed, **config):
    torch.manual_seed(seed)
    return write_export(path, intl.build_backbone("resnet18", "imagenet").state_dict(),
                             {"arch": "resnet18", "image_size": 16, **config})


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
    hub = {linear_eval.default_output_dir("me/intl"), linear_eval.default_output_dir("me/intl", revision="v1"),
           linear_eval.default_output_dir("me/intl", revision="v2")}
    assert len(hub) == 3 and linear_eval.default_output_dir("me/intl", "v1") == Path("runs/eval/me--intl--v1")


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
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".lock", "knn.json", "linear-cached.json"]  # no temp files


def test_a_backbone_with_non_finite_weights_is_refused_naming_the_tensor(folder, tmp_path):
    torch.manual_seed(0)
    weights = intl.build_backbone("resnet18", "imagenet").state_dict()
    weights["layer3.1.bn2.running_var"][5] = float("nan")
    write_export(tmp_path / "diverged", weights, {"arch": "resnet18", "image_size": 16})
    with pytest.raises(ValueError, match=r"tensor 'layer3.1.bn2.running_var' holds 1 NaN / Inf value\(s\)"):
        evaluate("--backbone", tmp_path / "diverged", "--dataset", folder, "--protocol", "knn", "--output_dir", tmp_path)


def test_a_trained_protocol_removes_what_interrupted_saves_left(pretrained, folder, tmp_path, capsys):
    common = ["--backbone", pretrained / "backbone", "--dataset", folder, "--protocol", "linear", *TINY,
              "--epochs", "2", "--output_dir", tmp_path]
    evaluate(*common, "--stop_after_epochs", "1")
    leftover = tmp_path / "checkpoints" / "linear" / ".tmp-epoch-0009"  # an epoch this run never saves
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a save")
    evaluate(*common, "--resume", "latest")
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
    assert str(info.value) == ("interrupted at epoch 2 of linear; continue with --resume latest (from the last "
                               "checkpoint, epoch-0001)")
    monkeypatch.setattr(linear_eval, "save_epoch", save_epoch)
    # --resume also takes the checkpoint folder itself, of the one trained protocol it is for.
    checkpoint = tmp_path / "checkpoints" / "linear" / "epoch-0001"
    with pytest.raises(ValueError, match="not a checkpoint of the one trained --protocol"):
        evaluate(*common, "--protocol", "linear", "finetune", "--subset_file", "unused", "--resume", checkpoint)
    assert evaluate(*common, "--resume", checkpoint)["linear"]["final_epoch"] == 2  # and it does continue


def image_folder(root, classes):
    """root/<split>/<class>/<name>, 8 x 8 images: classes = {split: {class: [names]}}."""
    from PIL import Image

    for split, folders in classes.items():
        for name, files in folders.items():
            (root / split / name).mkdir(parents=True)
            for file in files:
                Image.new("RGB", (8, 8), (40 * len(name), 9 * len(file), 0)).save(root / split / name / file)
    return root


def test_a_stopped_evaluation_resumes_only_with_its_own_backbone_and_a_rerun_is_offered_resume(folder, tmp_path):
    small_export(tmp_path / "a", 1)
    small_export(tmp_path / "b", 2)
    common = ["--dataset", folder, "--protocol", "linear", *TINY, "--epochs", "2", "--output_dir", tmp_path / "out"]
    evaluate("--backbone", tmp_path / "a", *common, "--stop_after_epochs", "1")
    with pytest.raises(ValueError, match="or continue the earlier run with --resume latest\\), or add --overwrite"):
        evaluate("--backbone", tmp_path / "a", *common)
    checkpoint = tmp_path / "out" / "checkpoints" / "linear" / "epoch-0001"
    with pytest.raises(ValueError, match=re.escape(f"--resume: {checkpoint} evaluates backbone {tmp_path / 'a'} (")
                       + f".*, not --backbone {re.escape(str(tmp_path / 'b'))} "):
        evaluate("--backbone", tmp_path / "b", *common, "--protocol", "knn", "linear", "--resume", "latest")
    assert not (tmp_path / "out" / "knn.json").exists()  # refused before any protocol ran
    small_export(tmp_path / "a", 3)  # other weights at the same path
    with pytest.raises(ValueError, match="evaluates backbone .* not --backbone .*: give that one"):
        evaluate("--backbone", tmp_path / "a", *common, "--resume", "latest")


def test_top5_is_reported_only_with_more_than_5_classes():
    correct = torch.tensor([[1, 1], [0, 1], [0, 0], [0, 1]])
    assert linear_eval.accuracy(correct, 6) == {"top1": 25.0, "top5": 75.0}
    assert linear_eval.accuracy(correct, 5) == {"top1": 25.0, "top5": None}  # any 5 of 5 classes hold the label


def test_test_classes_that_the_training_split_never_has_are_refused(tmp_path):
    root = image_folder(tmp_path / "images", {"train": {"c0": ["a.png"], "c1": ["b.png"]},
                                              "test": {"c0": ["t.png"], "c1": ["u.png"], "c2": ["v.png"]}})
    small_export(tmp_path / "backbone", 0)
    with pytest.raises(ValueError, match=r"\(split 'test'\) has 1 class\(es\) that .*\(split 'train'\) never has "
                                         r"\(first 2\): no classifier learns them"):
        evaluate("--backbone", tmp_path / "backbone", "--dataset", root, "--protocol", "knn", "--output_dir",
                 tmp_path / "out")


def test_subset_file_names_with_a_folder_match_that_path_and_a_name_of_several_images_is_refused(tmp_path):
    root = image_folder(tmp_path / "images", {"train": {"c0": ["a.png"], "c1": ["a.png", "b.png"]}})
    split = intl.load_image_split(root, "train")
    names = tmp_path / "subset.txt"
    names.write_text("c1/a.png\nb.png\n")
    chosen = linear_eval.training_subset(split, names).dataset.with_format("arrow")["image"]
    assert [Path(p).relative_to(root).as_posix() for p in chosen.combine_chunks().field("path").to_pylist()] == [
        "train/c1/a.png", "train/c1/b.png"]
    names.write_text("b.png\na.png\n")
    with pytest.raises(ValueError, match=r"--subset_file: 'a.png' names 2 images of .*: write it with"):
        linear_eval.training_subset(split, names)
    # A --subset_file that is no file: the system's one-line error naming it (intl.run prints it as "error: ...").
    for not_a_file, error in ((root, IsADirectoryError), (tmp_path / "absent.txt", FileNotFoundError)):
        with pytest.raises(error, match=re.escape(f": '{not_a_file}'")):
            linear_eval.training_subset(split, not_a_file)
