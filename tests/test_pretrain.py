"""pretrain.py: the offline default end to end, exact resume, multi-process data, export, bad input."""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file

import intl
import linear_eval
import pretrain

ROOT = Path(__file__).resolve().parents[1]
# A reduced budget of the digits default: same code path, seconds instead of minutes.
SMALL = ["--image_size", "16", "--batch_size", "128", "--projector", "64-64-64", "--num_workers", "0",
         "--log_every", "1", "--spectrum_every", "4", "--epochs", "1"]


def command(*args, env=None, launcher=None):
    """The command line of pretrain.py with these arguments, and its environment: offline, one thread (conftest)."""
    return ((launcher or [sys.executable]) + [str(ROOT / "pretrain.py"), *map(str, args)],
            {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})})


def run(*args, env=None, check=True, launcher=None):
    argv, env = command(*args, env=env, launcher=launcher)
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    return checked(result) if check else result


def checked(result):
    if result.returncode != 0:
        raise AssertionError(f"{result.args} failed:\n{result.stdout}\n{result.stderr}")
    return result


def losses(output_dir):
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture
def image_folder(tmp_path):
    """ROOT/class_x/*.png: 40 generated 20 x 20 images in 2 classes."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for c in range(2):
        (tmp_path / "images" / f"class_{c}").mkdir(parents=True)
        for i in range(20):
            pixels = torch.randint(0, 256, (20, 20, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / f"class_{c}" / f"{i}.png")
    return tmp_path / "images"


# digits_run (tests/conftest.py): `pretrain.py --output_dir DIR` (the README's first run) with SMALL, 4 epochs, the
# 5-NN every epoch and a checkpoint every 5 steps, in its own process; test_linear_eval evaluates the same run.


@pytest.mark.slow
def test_offline_default_writes_checkpoint_export_log_plot_and_summary(digits_run):
    output_dir, result = digits_run
    assert (output_dir / "spectrum.png").stat().st_size > 10_000
    assert (output_dir / "backbone" / "model.safetensors").is_file()
    checkpoints = sorted(p.name for p in (output_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-00000040", "step-00000044"]  # keep 2: step 40 (every 5) and the end of epoch 4
    log = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in log) == 44
    assert [r["step"] for r in log if "knn_top1" in r] == [0, 11, 22, 33, 44]
    assert any("lg_ioc_z" in r and "erank_z_hat" in r for r in log)
    assert "5-NN top-1" in result.stderr + result.stdout
    assert "summary" in result.stderr + result.stdout
    # A training run's export has no model card: the card comes with `linear_eval.py export` and the results.
    assert sorted(p.name for p in (output_dir / "backbone").iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.slow
def test_exported_backbone_loads_into_torchvision_with_only_fc_missing(digits_run):
    output_dir, _ = digits_run
    config = json.loads((output_dir / "backbone" / "config.json").read_text())
    for key in ("arch", "stem", "conv1", "maxpool", "feature_dim", "image_size", "mean", "std", "method", "epochs_trained"):
        assert key in config
    assert config["arch"] == "resnet18" and config["epochs_trained"] == 4
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(load_file(output_dir / "backbone" / "model.safetensors"), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


@pytest.mark.slow
def test_the_export_command_rebuilds_the_same_backbone_from_a_checkpoint(digits_run, tmp_path):
    output_dir, _ = digits_run
    linear_eval.main_export(["--source", str(output_dir / "checkpoints" / "step-00000044"), "--output_dir",
                             str(tmp_path / "backbone")])
    exported = load_file(tmp_path / "backbone" / "model.safetensors")
    original = load_file(output_dir / "backbone" / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


@pytest.mark.slow
def test_resumed_run_reproduces_the_uninterrupted_loss_curve(tiny_images, tmp_path):
    """The uninterrupted run in this process; the interrupted and the resumed one each in a fresh process (this
    process holds the lock of every folder it ran in), as after a crash: only what the checkpoint holds carries
    over."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    flags = ["--epochs", 3, "--log_every", 1, "--spectrum_every", 1]  # 4 steps per epoch, 12 steps
    tiny(tiny_images, "--output_dir", whole, *flags, "--method", "intl-m")
    run("--output_dir", parts, *tiny_args(tiny_images, *flags, "--method", "intl-m", "--stop_after_steps", 5))
    assert max(losses(parts)) == 5
    forgot = run("--output_dir", parts, *tiny_args(tiny_images, *flags, "--method", "intl-m"), check=False)
    assert forgot.returncode != 0 and "already holds checkpoints/" in forgot.stderr and "--resume latest" in forgot.stderr  # forgot --resume
    run("--output_dir", parts, "--resume", "latest", *tiny_args(tiny_images, *flags))
    expected, resumed = losses(whole), losses(parts)
    assert sorted(resumed) == sorted(expected) == list(range(1, 13))
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), step
    # The plot draws the spectra of the whole run, the ones logged before the interruption included.
    expected, resumed = pretrain.logged_spectra(whole / "log.jsonl"), pretrain.logged_spectra(parts / "log.jsonl")
    plotted = sorted(pretrain.plotted_steps(12, 1))
    assert [r[0] for r in resumed] == [r[0] for r in expected] == plotted and plotted[:3] == [1, 3, 5]
    for (_, before, _), (_, after, _) in zip(expected, resumed):
        assert after == pytest.approx(before, rel=1e-4, abs=1e-9)
    assert (parts / "spectrum.png").stat().st_size > 10_000


@pytest.mark.slow
def test_two_gloo_processes_pretrain_on_an_image_folder(tmp_path, image_folder):
    result = run("--preset", "digits", "--dataset", image_folder, "--output_dir", tmp_path / "out", "--image_size",
                 "16", "--batch_size", "16", "--projector", "32-32-32", "--arch", "resnet18", "--epochs", "1",
                 "--num_workers", "0", "--log_every", "1", "--spectrum_every", "1", "--knn_every", "0",
                 env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
                 launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
    assert "2 process(es)" in result.stdout + result.stderr
    assert "global batch 16 (8 per process)" in result.stdout + result.stderr  # --batch_size is the global batch
    assert (tmp_path / "out" / "backbone" / "model.safetensors").is_file()
    recipe = json.loads((tmp_path / "out" / "backbone" / "config.json").read_text())["recipe"]
    assert (recipe["batch_size"], recipe["method"]) == (16, "intl")
    # One process cannot continue what two started: the global batch would change.
    with pytest.raises(ValueError, match="trained with 2 processes, this run has 1"):
        pretrain.main(["--output_dir", str(tmp_path / "out"), "--resume", "latest", "--num_workers", "0"])


LOADER_SCRIPT = """
import json, sys
import torch.distributed as dist
from accelerate import Accelerator
sys.path.insert(0, {root!r})
import intl, pretrain

accelerator = Accelerator()
config = pretrain.resolve_config(["--print_config", "--dataset", {folder!r}, "--image_size", "8", "--batch_size", "8",
                                  "--num_workers", "1", "--jitter", "0", "0", "0", "0", "--grayscale_prob", "0",
                                  "--blur_prob", "0", "0", "--solarize_prob", "0", "0", "--mean", "0", "0", "0",
                                  "--std", "1", "1", "1"])
loader = pretrain.training_loader(config, intl.load_image_split({folder!r}, "train"), accelerator)
seen = []
for epoch in range(2):
    loader.sampler.set_epoch(epoch)
    # Image i is a solid colour with red = 5 i: a crop of it (no colour change) says which image it came from.
    seen.append([(round(views[0][b, 0, 0, 0].item() * 255 / 5), labels[b].item())
                 for views, labels in loader for b in range(len(labels))])
everyone = [None] * accelerator.num_processes
dist.all_gather_object(everyone, seen)
if accelerator.is_main_process:
    json.dump(everyone, open({out!r}, "w"))
"""


@pytest.mark.slow
def test_two_real_processes_load_disjoint_shares_of_every_epoch_and_a_new_order_each_epoch(tmp_path):
    from PIL import Image

    for i in range(40):
        (tmp_path / "images" / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), (5 * i, 128, 0)).save(tmp_path / "images" / f"class_{i % 2}" / f"{i}.png")
    script = tmp_path / "loader.py"
    script.write_text(LOADER_SCRIPT.format(root=str(ROOT), folder=str(tmp_path / "images"), out=str(tmp_path / "seen.json")))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads((tmp_path / "seen.json").read_text())
    for epoch in range(2):
        shares = [[image for image, _ in rank[epoch]] for rank in ranks]
        assert [len(share) for share in shares] == [20, 20]  # 40 images = 5 global batches of 2 x 4
        assert sorted(shares[0] + shares[1]) == list(range(40))  # every image once, on one process only
        assert all(label == image % 2 for rank in ranks for image, label in rank[epoch])
    assert ranks[0][0] != ranks[0][1]  # a new permutation each epoch


def test_processes_see_disjoint_slices_of_every_global_batch_and_resume_skips_done_batches():
    ranks = [pretrain.ShardedEpochSampler(103, 8, 3, rank, seed=1) for rank in range(3)]
    per_rank = [list(sampler) for sampler in ranks]
    single = list(pretrain.ShardedEpochSampler(103, 24, 1, 0, seed=1))
    assert ranks[0].batches_per_epoch == 4 and all(len(p) == 32 for p in per_rank)
    for b in range(4):
        global_batch = sum((p[b * 8:(b + 1) * 8] for p in per_rank), [])
        assert global_batch == single[b * 24:(b + 1) * 24]
    indices = [i for p in per_rank for _, i in p]
    assert len(set(indices)) == 96
    ranks[1].set_epoch(0, start_batch=3)
    assert list(ranks[1]) == per_rank[1][24:]
    ranks[1].set_epoch(1)
    assert [i for _, i in ranks[1]] != [i for _, i in per_rank[1]]


def test_augmentations_are_per_sample_and_replayed_from_seed_epoch_and_index(digits_split):
    config = pretrain.resolve_config(["--print_config", "--image_size", "16"])
    split = digits_split("train")
    views = pretrain.AugmentedViews(split, pretrain.view_transforms(config), seed=0)
    first, _ = views[(0, 5)]
    again, _ = views[(0, 5)]
    next_epoch, _ = views[(1, 5)]
    assert len(first) == 2 and first[0].shape == (3, 16, 16)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], next_epoch[0])
    assert not torch.equal(first[0], first[1])  # two views of one image differ


def test_multi_crop_views_have_the_recipe_sizes_and_scales():
    config = pretrain.resolve_config(["--preset", "intl-m-100ep", "--print_config"])
    transforms = pretrain.view_transforms(config)
    crops = [t.transforms[0] for t in transforms]
    assert [c.size for c in crops] == [(224, 224)] * 2 + [(192, 192), (160, 160), (128, 128), (96, 96)]
    assert crops[0].scale == (0.2, 1.0)
    # The authors' rounded values, exactly.
    assert [c.scale for c in crops[2:]] == [(0.171, 0.857), (0.143, 0.714), (0.114, 0.571), (0.086, 0.429)]


def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_a_thousandth():
    assert pretrain.learning_rate(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert pretrain.learning_rate(4, 100, 10, 1.0) == pytest.approx(0.5)
    assert pretrain.learning_rate(10, 100, 10, 1.0) == pytest.approx(0.001 + 0.999 * (1 + math.cos(math.pi / 90)) / 2)
    # After the warm-up the progress is (step + 1 - 10) / 90, as the authors': half-way at step 54, the end at 99.
    assert pretrain.learning_rate(54, 100, 10, 1.0) == pytest.approx((1 + 0.001) / 2)
    assert pretrain.learning_rate(99, 100, 10, 1.0) == pytest.approx(0.001)


def test_presets_set_the_recipe_and_explicit_flags_win():
    config = pretrain.resolve_config(["--preset", "cifar10", "--print_config"])
    assert (config.arch, config.stem, config.projector, config.lr, config.epochs) == \
           ("resnet18", "cifar", "2048-2048-2048", 0.3, 1000)
    assert config.dataset == "uoft-cs/cifar10" and config.solarize_prob == (0.0, 0.2)
    config = pretrain.resolve_config(["--preset", "cifar10", "--print_config", "--lr", "0.1", "--stem", "imagenet"])
    assert config.lr == 0.1 and config.stem == "imagenet"
    assert pretrain.resolve_config(["--print_config"]).preset == "digits"


def test_interrupted_save_never_counts_as_a_checkpoint(tmp_path):
    good = tmp_path / "checkpoints" / "step-00000010"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text("{}")
    (good / "model.safetensors").write_text("")
    (tmp_path / "checkpoints" / ".tmp-step-00000020").mkdir()
    assert intl.latest_checkpoint(tmp_path) == good


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--batch_size", "1"], "--batch_size 1: must be in [2, inf)"),  # refused while reading the flags
    (["--dataset", "someone/not-cached"], "--dataset"),  # refused while loading the data, after the Accelerator
])
def test_bad_input_gives_one_clear_line_and_a_nonzero_exit(tmp_path, args, message):
    result = run("--output_dir", tmp_path, *args, "--num_workers", "0", check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope"], "invalid choice: 'nope'"),
    (["--resume", "{tmp}"], "not a checkpoint folder"),
    (["--resume", "latest"], "no checkpoint in"),
    (["--projector", "12-x"], "cannot parse projector spec"),
    (["--batch_size", "4000"], "1437 images, fewer than one global batch of 4000: give --batch_size 1437 or less"),
    (["--save_every", "0"], "--save_every 0: must be "),
    (["--min_scale", "1.5"], "--min_scale 1.5: must be in (0, 1]"),
    (["--epochs", "0"], "--epochs 0: must be "),
])
def test_bad_input_is_refused_with_a_clear_message(tmp_path, capsys, args, message):
    """What the command line turns into one `error: ...` line and a non-zero exit (above): a ValueError, or
    argparse's own exit with its message on stderr."""
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    with pytest.raises((ValueError, SystemExit)) as info:
        pretrain.main(["--output_dir", str(tmp_path), *args, "--num_workers", "0"])
    if info.type is SystemExit:
        assert info.value.code != 0 and message in capsys.readouterr().err
    else:
        assert message in str(info.value)


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_last_checkpoint(tiny_images, tmp_path):
    result = run("--output_dir", tmp_path, *tiny_args(tiny_images, "--epochs", 2, "--lr", "1e12", "--warmup_epochs", 0),
                 check=False)
    assert result.returncode != 0
    assert "at step" in result.stderr and "last good checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_unreadable_image_stops_with_one_line_naming_the_file(tmp_path, image_folder):
    (image_folder / "class_0" / "3.png").write_bytes(b"not a png")
    result = run("--dataset", image_folder, "--output_dir", tmp_path / "out", "--image_size", "16",
                 "--batch_size", "40", "--projector", "32-32-32", "--epochs", "1", "--num_workers", "2", check=False)
    assert result.returncode != 0
    assert "class_0/3.png" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- nothing lost, nothing silently wrong


def write_tiny_images(root):
    """ROOT/class_x/*.png: 16 generated 8 x 8 images in 2 classes (a run of 4 steps per epoch takes seconds)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for c in range(2):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(8):
            pixels = torch.randint(0, 256, (8, 8, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory):
    """ROOT/class_x/*.png: write_tiny_images in a new folder."""
    return write_tiny_images(tmp_path_factory.mktemp("tiny") / "images")


def tiny_args(images, *args):
    """The flags of a run on the tiny images (4 steps per epoch)."""
    return ["--dataset", str(images), "--image_size", "8", "--batch_size", "4", "--projector", "16-16-16",
            "--arch", "resnet18", "--num_workers", "0", "--knn_every", "0", *map(str, args)]


def tiny(images, *args):
    """pretrain.main in this process on the tiny images (no start-up cost)."""
    pretrain.main(tiny_args(images, *args))


@pytest.fixture(scope="module")
def stopped_run(tiny_images, tmp_path_factory):
    """A run of 8 steps stopped after 4: checkpoints of steps 2 and 4, every step logged."""
    output_dir = tmp_path_factory.mktemp("stopped")
    tiny(tiny_images, "--output_dir", output_dir, "--epochs", 2, "--save_every", 2, "--log_every", 1,
         "--stop_after_steps", 4)
    return output_dir


@pytest.fixture(scope="module")
def finished_run(tiny_finished_run):
    """A finished run of 4 steps (1 epoch) on the tiny images: checkpoints of steps 2 and 4, backbone/ exported
    (conftest's tiny_finished_run, which test_linear_eval and test_hub read too: only copies of it are changed)."""
    return tiny_finished_run.run


def copy_run(run, to, only=None):
    """A copy of a run folder (or of its `only` entry). The large checkpoint files are hard links: a test that damages
    one replaces it (`replace_file`) rather than writing into it."""
    def link_or_copy(src, dst):
        return os.link(src, dst) if src.endswith((".safetensors", ".bin")) else shutil.copy2(src, dst)

    shutil.copytree(run / only if only else run, to / only if only else to, copy_function=link_or_copy)
    return to


def replace_file(path, data):
    path.unlink()
    path.write_bytes(data)


def test_resume_latest_refuses_a_damaged_newest_checkpoint_and_an_earlier_one_resumes(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run, tmp_path / "run")
    damaged = run / "checkpoints" / "step-00000004" / "model.safetensors"
    replace_file(damaged, damaged.read_bytes()[:damaged.stat().st_size // 2])
    with pytest.raises(ValueError) as info:
        pretrain.main(["--output_dir", str(run), "--resume", "latest", "--stop_after_steps", "5"])
    assert f"{damaged} could not be read: SafetensorError" in str(info.value) and "\n" not in str(info.value)
    earlier = run / "checkpoints" / "step-00000002"
    pretrain.main(["--output_dir", str(run), "--resume", str(earlier), "--stop_after_steps", "5"])
    assert f"resumed from {earlier} at step 2" in capsys.readouterr().out
    # Steps 3 and 4 were done again: the damaged checkpoint is replaced by a good one; every step is logged.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    intl.read_safetensors(damaged)  # a whole file again
    assert sorted(losses(run)) == [1, 2, 3, 4, 5]


def refused_optimizer(path):
    """optimizer.bin holding a Python object torch.load(weights_only=True) refuses (a pickle of a class)."""
    import argparse

    replace_file(path, b"")
    torch.save({"state": {}, "param_groups": [], "args": argparse.Namespace(lr=0.1)}, path)


@pytest.mark.parametrize("name, damage, message", [
    ("model.safetensors", lambda p: replace_file(p, p.read_bytes()[:1000]),
     "model.safetensors could not be read: SafetensorError: Error while deserializing header"),
    ("model.safetensors", lambda p: replace_file(p, p.read_bytes()[:p.stat().st_size - 10]),
     "model.safetensors could not be read: SafetensorError: Error while deserializing header"),
    ("optimizer.bin", lambda p: replace_file(p, p.read_bytes()[:p.stat().st_size // 2]),
     "optimizer.bin could not be read: RuntimeError: PytorchStreamReader failed"),
    ("optimizer.bin", refused_optimizer, "optimizer.bin could not be read: it holds Python objects that "
                                         "torch.load(weights_only=True) refuses"),
    ("random_states_0.pkl", lambda p: replace_file(p, b"garbage"), "random_states_0.pkl could not be read: "),
])
def test_a_damaged_checkpoint_is_refused_naming_its_file_and_what_is_wrong(stopped_run, tmp_path, name, damage, message):
    run = copy_run(stopped_run, tmp_path / "run")
    checkpoint = run / "checkpoints" / "step-00000004"
    damage(checkpoint / name)
    with pytest.raises(ValueError) as info:
        pretrain.main(["--output_dir", str(run), "--resume", str(checkpoint)])
    assert str(info.value).startswith(f"{checkpoint / message}")
    assert "resume from an earlier checkpoint" in str(info.value) and "weights_only=False" not in str(info.value)


def test_a_resumed_run_removes_what_interrupted_saves_left(stopped_run, tmp_path, capsys):
    run = copy_run(stopped_run, tmp_path / "run")
    leftover = run / "checkpoints" / ".tmp-step-00000006"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a save")
    pretrain.main(["--output_dir", str(run), "--resume", "latest", "--stop_after_steps", "5"])
    assert not leftover.exists()
    assert f"removed {leftover}, left by an interrupted save" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["latest, at the end of a finished run", "a copied checkpoint, into a new folder"])
def test_resuming_copied_checkpoints_without_their_log_starts_the_log_again(finished_run, stopped_run, tmp_path,
                                                                             capsys, case):
    if case.startswith("latest"):
        run = copy_run(finished_run, tmp_path / "copy", only="checkpoints")  # checkpoints/ alone, no log.jsonl
        pretrain.main(["--output_dir", str(run), "--resume", "latest"])
        assert (run / "backbone" / "model.safetensors").is_file()  # the finished run's export, made again
        assert "no log.jsonl" in capsys.readouterr().out
    else:
        copy = copy_run(stopped_run, tmp_path / "copy", only="checkpoints")
        run = tmp_path / "new"
        pretrain.main(["--output_dir", str(run), "--resume", str(copy / "checkpoints" / "step-00000004"),
                       "--stop_after_steps", "5"])
        assert sorted(losses(run)) == [5]
        assert "the log starts again at step 4" in capsys.readouterr().out


def test_a_new_run_replaces_what_an_earlier_run_left_only_with_overwrite(tiny_images, tmp_path):
    run = tmp_path / "run"
    intl.write_export(run / "backbone", intl.build_backbone("resnet18").state_dict(), {"stem": "imagenet"})
    (run / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="already holds backbone/ of an earlier run"):
        tiny(tiny_images, "--output_dir", run, "--stop_after_steps", 1)
    assert (run / "log.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n' and (run / "backbone").is_dir()
    tiny(tiny_images, "--output_dir", run, "--stop_after_steps", 1, "--log_every", 1, "--overwrite")
    assert not (run / "backbone").exists()  # the earlier run's export is gone, not mixed with this run
    assert [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r] == [1]


def test_the_plot_keeps_a_bounded_number_of_spectra_evenly_spread_first_and_last_included():
    assert sorted(pretrain.plotted_steps(11, 4)) == [4, 8, 11]
    assert sorted(pretrain.plotted_steps(100, 1)) == [1, 21, 41, 60, 80, 100]
    imagenet = pretrain.plotted_steps(800 * 5004, 100)  # 40,032 logged spectra of an 800-epoch run
    assert len(imagenet) == 6 and min(imagenet) == 100 and max(imagenet) == 800 * 5004


@pytest.mark.slow
def test_a_run_writes_only_the_plotted_spectra_as_it_goes(tiny_images, tmp_path):
    tiny(tiny_images, "--output_dir", tmp_path, "--epochs", 3, "--spectrum_every", 1)  # 12 steps
    written = pretrain.logged_spectra(tmp_path / "log.jsonl")
    assert [step for step, *_ in written] == sorted(pretrain.plotted_steps(12, 1)) == [1, 3, 5, 8, 10, 12]
    logged = [r["step"] for r in intl.read_jsonl(tmp_path / "log.jsonl") if "erank_z" in r]
    assert logged == list(range(1, 13))


def test_collapse_is_an_embedding_at_one_point_or_along_one_direction():
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 16, generator=generator, dtype=torch.float64)
    point = torch.ones(64, 16) * 3 + 1e-6 * spread
    line = torch.randn(64, 1, generator=generator) * torch.randn(1, 16, generator=generator) + 1e-4 * spread
    for axis in (0, 1):
        assert not pretrain.collapsed(spread, pretrain.covariance_spectrum(spread, axis))
        assert pretrain.collapsed(point, pretrain.covariance_spectrum(point, axis))
        assert pretrain.collapsed(line, pretrain.covariance_spectrum(line, axis))


@pytest.mark.slow
def test_a_collapsed_run_is_flagged_once_in_the_log_and_the_summary(tmp_path, capsys):
    from PIL import Image

    for c in range(2):  # one grey image, 16 times: nothing to tell apart
        (tmp_path / "grey" / f"class_{c}").mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (8, 8), (128, 128, 128)).save(tmp_path / "grey" / f"class_{c}" / f"{i}.png")
    tiny(tmp_path / "grey", "--output_dir", tmp_path / "run", "--epochs", 1, "--batch_size", 16, "--jitter", 0, 0, 0, 0)
    warnings = [r for r in intl.read_jsonl(tmp_path / "run" / "log.jsonl") if "warning" in r]
    assert len(warnings) == 1 and "the embedding has collapsed at step 1" in warnings[0]["warning"]
    summary = capsys.readouterr().out.split("summary (first logged -> last logged):")[1]
    assert "warning (step 1): the embedding has collapsed" in summary
    assert re.search(r"lg IoC of Z +step +1: rank-deficient", summary)  # never a number made up from a clamp
    assert (tmp_path / "run" / "spectrum.png").is_file()
    with pytest.raises(FloatingPointError, match="the embedding had collapsed at step 1 before"):
        tiny(tmp_path / "grey", "--output_dir", tmp_path / "longer", "--epochs", 2, "--jitter", 0, 0, 0, 0,
             "--spectrum_every", 1)


@pytest.mark.slow
def test_a_ctrl_c_that_python_discards_inside_a_finaliser_is_still_remembered(monkeypatch):
    import signal
    import time

    class Finalised:
        def __del__(self):  # Ctrl-C arrives while a finaliser runs: Python discards its KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)

    def main(argv):
        Finalised()  # deleted at once; nothing reaches this frame
        seen.append(intl.stop_requested)

    discarded, seen = [], []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: discarded.append(unraisable.exc_type))
    monkeypatch.setattr(intl, "stop_requested", False)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        intl.run(main, [])
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    assert discarded == [KeyboardInterrupt] and seen == [True]


def test_a_remembered_ctrl_c_stops_the_training_loop_at_its_next_step(tiny_images, tmp_path, monkeypatch):
    monkeypatch.setattr(intl, "stop_requested", True)
    with pytest.raises(intl.Interrupted, match="interrupted at step 0, before the first checkpoint"):
        tiny(tiny_images, "--output_dir", tmp_path, "--epochs", 2)


def test_ctrl_c_stops_with_one_line_saying_the_step_and_how_to_continue_and_exit_status_130(tiny_images, tmp_path):
    import signal
    import time

    command = [sys.executable, str(ROOT / "pretrain.py"), "--dataset", str(tiny_images), "--image_size", "8",
               "--batch_size", "4", "--projector", "16-16-16", "--arch", "resnet18", "--num_workers", "0",
               "--knn_every", "0", "--epochs", "200", "--save_every", "2", "--log_every", "1", "--output_dir",
               str(tmp_path)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                    "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (tmp_path / "log.jsonl").exists() and len(losses(tmp_path)) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # still running: make it print where it is (faulthandler), then fail with that
        process.send_signal(signal.SIGABRT)
        _, stderr = process.communicate(timeout=60)
        pytest.fail(f"still running 120 s after Ctrl-C; its stacks:\n{stderr[-6000:]}")
    assert process.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted at step \d+; continue with --resume latest \(from the last checkpoint, "
                        r"step-\d{8}\)", last), last
    assert "Traceback" not in stderr


def test_the_first_non_finite_loss_is_kept_on_the_device_and_reported_with_its_step():
    watch = pretrain.NonFiniteWatch("cpu")
    watch.record(torch.tensor(1.0), 0)
    watch.check(None)
    watch.record(torch.tensor(float("nan")), 1)
    watch.record(torch.tensor(float("inf")), 2)
    with pytest.raises(FloatingPointError, match="the loss is nan at step 1; the last good checkpoint is step-0"):
        watch.check("step-0")
    with pytest.raises(FloatingPointError, match="Check the data first: many identical images"):  # blank ones, say
        watch.check("step-0")


def test_a_diverging_run_names_the_same_first_bad_step_however_rarely_it_logs(tiny_images, tmp_path):
    messages = []
    for log_every in (1, 3):
        with pytest.raises(FloatingPointError) as info:
            tiny(tiny_images, "--output_dir", tmp_path / str(log_every), "--epochs", 4, "--lr", "1e12",
                 "--warmup_epochs", 0, "--log_every", log_every, "--save_every", 100)
        messages.append(str(info.value).split(";")[0])
    assert messages[0] == messages[1] and messages[0].startswith("the loss is ")


@pytest.mark.slow
def test_benchmark_prints_the_step_time_images_per_s_memory_and_the_objectives_share(capsys):
    figures = pretrain.main(["--benchmark", "1", "--arch", "resnet18", "--image_size", "16", "--batch_size", "8",
                             "--projector", "16-16-16"])
    assert json.loads(capsys.readouterr().out) == figures
    for key in ("step_s", "objective_s", "peak_memory_mib"):
        assert figures[key] > 0, key
    assert figures["objective_share"] == pytest.approx(figures["objective_s"] / figures["step_s"], rel=0.01)
    assert figures["images_per_s"] == pytest.approx(8 / figures["step_s"], rel=0.01)


@pytest.mark.slow
def test_compiled_encoder_and_projector_give_the_eager_loss_gradients_and_parameter_names():
    config = pretrain.resolve_config(["--benchmark", "1", "--arch", "resnet18", "--image_size", "16", "--batch_size",
                                      "16", "--projector", "32-32-32"])
    views = [torch.rand(16, 3, 16, 16) for _ in range(2)]
    results = []
    for compile in (False, True):
        config.compile = compile
        torch.manual_seed(0)
        model = pretrain.on_the_accelerator(pretrain.build_model(config), config, torch.device("cpu"))
        loss = model(views)["loss"]
        loss.backward()
        results.append((loss.detach(), {name: p.grad for name, p in model.named_parameters()}, model.state_dict()))
    (eager_loss, eager_grads, eager_state), (loss, grads, state) = results
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():  # compiled kernels sum in another order: equal relative to each gradient's norm
        assert (grad - eager_grads[name]).norm() <= 1e-3 * eager_grads[name].norm() + 1e-8, name
    assert list(state) == list(eager_state)  # checkpoints and exports keep their keys


def test_a_run_prints_its_method_data_preset_encoder_size_batch_and_epochs_first(tiny_finished_run):
    lines = tiny_finished_run.stdout.splitlines()  # what conftest's tiny run printed (tiny_args, --epochs 1)
    assert f"intl on {tiny_finished_run.images} (no preset: the flags and their defaults): resnet18, 8 px, global " \
           "batch 4 (4 per process), 1 epoch" in lines[:3]




@pytest.mark.parametrize("launcher, flags, expected", [
    ({}, [], "no"),  # the preset's fp16 needs a GPU
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, [], "bf16"),  # accelerate launch --mixed_precision bf16
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["--mixed_precision", "no"], "no"),  # the script's own flag wins
])
def test_the_launchers_precision_wins_over_a_preset_and_the_scripts_flag_over_both(monkeypatch, launcher, flags,
                                                                                  expected):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = pretrain.resolve_config(["--preset", "imagenet-800ep", "--print_config", *flags])
    assert config.mixed_precision == expected


def test_a_run_says_when_its_warm_up_outlasts_it_and_where_to_continue_when_stopped(tiny_images, tmp_path, capsys):
    tiny(tiny_images, "--output_dir", tmp_path, "--epochs", 1, "--warmup_epochs", 2, "--stop_after_steps", 2)
    out = capsys.readouterr().out
    assert "note: the warm-up (8 steps) outlasts the run: the lr never reaches its peak" in out
    assert (f"stopped after step 2 of 4 (--stop_after_steps); the checkpoint is {tmp_path / 'checkpoints'}"
            f"/step-00000002. Continue with: python pretrain.py --output_dir {tmp_path} --resume latest") in out


def test_a_finished_run_names_its_backbone_its_log_and_the_next_command(tiny_finished_run):
    run = tiny_finished_run.run
    assert (f"done: the backbone is in {run / 'backbone'}, the log in {run / 'log.jsonl'}. Next: python linear_eval.py "
            f"--backbone {run / 'backbone'} --dataset LABELLED_DATA") in tiny_finished_run.stdout  # a local folder


def test_a_flat_folder_of_unlabelled_photos_pretrains_and_the_knn_monitor_says_it_has_no_labels(tmp_path, capsys):
    from PIL import Image

    for i in range(8):
        (tmp_path / "photos").mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(tmp_path / "photos" / f"{i}.jpg")
    tiny(tmp_path / "photos", "--output_dir", tmp_path / "run", "--epochs", 1, "--knn_every", 1)
    captured = capsys.readouterr()
    assert f"no kNN monitor: {tmp_path / 'photos'}" in captured.err and "has no class labels" in captured.err
    assert (tmp_path / "run" / "backbone" / "model.safetensors").is_file()




def test_the_trace_loss_weight_is_resolved_from_the_global_batch_and_recorded_where_the_run_is(tiny_finished_run):
    assert pretrain.resolve_config(["--print_config", "--batch_size", "64"]).beta == pytest.approx(0.03)
    assert pretrain.resolve_config(["--print_config", "--axis", "1", "--projector", "64-32"]).beta == pytest.approx(0.02)
    assert intl.default_beta(4) == 0.0  # 0.01 (log2 4 - 3) < 0 would reward variances away from 1
    run = tiny_finished_run.run  # batch 4
    state = json.loads(sorted((run / "checkpoints").glob("step-*/trainer_state.json"))[-1].read_text())
    exported = json.loads((run / "backbone" / "config.json").read_text())
    assert state["config"]["beta"] == state["backbone"]["recipe"]["beta"] == exported["recipe"]["beta"] == 0.0


def test_the_global_batch_is_split_over_the_processes_or_refused_naming_the_nearest_that_splits(tiny_images):
    split = intl.load_image_split(tiny_images, "train")
    config = pretrain.resolve_config(["--print_config", "--dataset", str(tiny_images), "--batch_size", "8",
                                      "--image_size", "8", "--num_workers", "0"])
    two = argparse.Namespace(num_processes=2, process_index=1, device=torch.device("cpu"))
    assert pretrain.training_loader(config, split, two).batch_size == 4
    config.batch_size = 256
    three = argparse.Namespace(num_processes=3, process_index=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="--batch_size 256 is the global batch and must split evenly over the 3 "
                                         "processes: give --batch_size 255"):
        pretrain.training_loader(config, split, three)


def test_a_resume_on_a_split_that_grew_or_shrank_is_refused_naming_both_sizes(tiny_images, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny_images, images)
    tiny(images, "--output_dir", tmp_path / "run", "--epochs", 2, "--save_every", 2, "--stop_after_steps", 2)
    for i in range(4):  # 16 -> 20 images: 5 steps per epoch instead of 4, another schedule
        shutil.copy(images / "class_0" / "0.png", images / "class_0" / f"extra-{i}.png")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'run' / 'checkpoints' / 'step-00000002'} was "
                                                   "trained on 16 images, --split train now holds 20: the steps per "
                                                   "epoch and the schedule would change")):
        pretrain.main(["--output_dir", str(tmp_path / "run"), "--resume", "latest"])


def test_the_training_split_as_the_held_out_split_is_refused_and_leaves_no_earlier_run(tiny_images, tmp_path):
    """The 5-NN monitor would report training images as held out; the refused run leaves nothing that makes the
    corrected command 'an earlier run'."""
    with pytest.raises(ValueError, match=re.escape(f"--eval_split train is the training split of {tiny_images} "
                                                   "(split 'train'): the 5-NN monitor would report training images")):
        tiny(tiny_images, "--output_dir", tmp_path, "--split", "train", "--eval_split", "train", "--knn_every", 1,
             "--stop_after_steps", 1)
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]
    tiny(tiny_images, "--output_dir", tmp_path, "--stop_after_steps", 1)


def test_a_held_out_split_that_does_not_load_ends_the_run_naming_it(tiny_images, tmp_path):
    with pytest.raises(ValueError, match="'nope'"):
        tiny(tiny_images, "--output_dir", tmp_path, "--knn_every", 1, "--eval_split", "nope", "--stop_after_steps", 1)


def test_a_split_of_one_image_is_refused_as_too_few_for_the_smallest_global_batch(tmp_path):
    from PIL import Image

    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "0.png")
    with pytest.raises(ValueError, match=re.escape("the split has 1 image(s), too few for one global batch of 2: "
                                                   "add images")):
        tiny(tmp_path / "one", "--output_dir", tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]


def test_a_run_killed_during_its_first_save_is_not_an_earlier_run(tiny_images, tmp_path, capsys):
    """What such a kill leaves: the log of the first steps and a half-written checkpoint: nothing to resume, so the
    command run again starts afresh, removing both (the log: a new run's log starts empty)."""
    (tmp_path / "log.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    (tmp_path / "checkpoints" / ".tmp-step-00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".tmp-step-00000002" / "model.safetensors").write_bytes(b"half a save")
    with pytest.raises(ValueError, match="--resume latest: no checkpoint in"):
        tiny(tiny_images, "--output_dir", tmp_path, "--resume", "latest")
    tiny(tiny_images, "--output_dir", tmp_path, "--stop_after_steps", 1, "--log_every", 1)
    out = capsys.readouterr().out
    assert f"removed {tmp_path / 'checkpoints' / '.tmp-step-00000002'}, left by an interrupted save" in out
    assert sorted(losses(tmp_path)) == [1] and losses(tmp_path)[1] != 9.0
