"""The rules every script follows, each from one mechanism: settings checked by one table (flags and saved
configurations), output folders checked before any work and locked while a run uses them, files replaced whole or not
at all (a full disk included), resumed runs keeping their run-control values, one check of loaded weights, one error
boundary, SIGTERM handled like Ctrl-C."""

import argparse
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

import detect_transfer
import intl
from conftest import write_export
import linear_eval
import pretrain

SCRIPTS = {"pretrain": pretrain, "linear_eval": linear_eval, "detect_transfer": detect_transfer}


def resolve(script, argv):
    """The configuration check of a script, as its main runs it first."""
    if script == "pretrain":
        return pretrain.resolve_config(argv)
    if script == "linear_eval":
        return linear_eval.resolve_args(["--backbone", "x", *argv])
    return detect_transfer.resolve_config(["--dataset", "voc", "--backbone", "random", "--arch", "resnet18",
                                           "--data_root", ".", *argv])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_of_every_script_has_a_checked_range(script):
    module = SCRIPTS[script]
    numeric = {a.dest for a in module.get_parser()._actions if a.type in (int, float) and not a.choices}
    assert numeric - set(module.RANGES) == set()


@pytest.mark.parametrize("script, argv, message", [
    ("pretrain", ["--momentum", "2"], "--momentum 2.0: must be in [0, 1]"),
    ("pretrain", ["--lr", "-1"], "--lr -1.0: must be in (0, inf)"),
    ("pretrain", ["--beta", "nan"], "--beta nan: must be in [0, inf)"),
    ("pretrain", ["--image_size", "0"], "--image_size 0: must be in [1, inf)"),
    ("pretrain", ["--std", "0.2", "0", "0.2"], "--std 0.2 0.0 0.2: each value must be in (0, inf)"),
    ("pretrain", ["--mean", "0.5", "inf", "0.5"], "--mean 0.5 inf 0.5: each value must be in (-inf, inf)"),
    ("pretrain", ["--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
    ("pretrain", ["--w_size", "1"], "--w_size 1: must be in [2, inf)"),
    ("pretrain", ["--warmup_epochs", "-1"], "--warmup_epochs -1.0: must be in [0, inf)"),
    ("pretrain", ["--num_workers", "-1"], "--num_workers -1: must be in [0, inf)"),
    ("pretrain", ["--small_crops", "96", "300", "--image_size", "224"], "--small_crops 96 300: every side"),
    ("pretrain", ["--study", "trace", "--study_values", "1", "2.5"], "--study_values 1.0 2.5: give iteration counts"),
    ("linear_eval", ["--min_lr", "-1"], "--min_lr -1.0: must be in [0, inf)"),
    ("linear_eval", ["--milestones", "0.6", "1.5"], "--milestones 0.6 1.5: each value must be in [0, 1]"),
    ("linear_eval", ["--lr", "-1"], "--lr -1.0: must be in (0, inf)"),
    ("linear_eval", ["--image_size", "0"], "--image_size 0: must be in [1, inf)"),
    ("linear_eval", ["--k", "5", "0"], "--k 5 0: each value must be in [1, inf)"),
    ("detect_transfer", ["--lr", "0"], "--lr 0.0: must be in (0, inf)"),
    ("detect_transfer", ["--lr_steps", "-5"], "--lr_steps -5: each value must be in [0, inf)"),
    ("detect_transfer", ["--train_sizes", "0", "96"], "--train_sizes 0 96: each value must be in [1, inf)"),
    # inf and nan lie in no interval.
    ("pretrain", ["--lr", "inf"], "--lr inf: must be in (0, inf)"),
    ("pretrain", ["--epochs", "1", "--weight_decay", "inf"], "--weight_decay inf: must be in [0, inf)"),
    ("linear_eval", ["--lr", "nan"], "--lr nan: must be in (0, inf)"),
    ("detect_transfer", ["--lr", "inf"], "--lr inf: must be in (0, inf)"),
])
def test_out_of_range_flags_are_refused_naming_the_flag_and_its_range(script, argv, message, tmp_path):
    with pytest.raises(ValueError) as info:
        resolve(script, ["--output_dir", str(tmp_path), *argv])
    assert str(info.value).startswith(message)


@pytest.mark.parametrize("script", SCRIPTS)
def test_fp16_without_a_gpu_is_refused_by_every_script_from_the_flag_or_the_launcher(script, tmp_path, monkeypatch):
    """Accelerate would report fp16 and compute in float32 on a CPU: a precision that is not the one recorded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    with pytest.raises(ValueError, match=re.escape("--mixed_precision fp16 needs a GPU: on a CPU use bf16 or no")):
        resolve(script, ["--output_dir", str(tmp_path), "--mixed_precision", "fp16"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")  # accelerate launch --mixed_precision fp16
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve(script, ["--output_dir", str(tmp_path)])
    assert resolve(script, ["--output_dir", str(tmp_path), "--mixed_precision", "bf16"]).mixed_precision == "bf16"


def test_a_resumed_fp16_run_without_a_gpu_is_refused_naming_its_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    folder = fake_checkpoint(tmp_path, 4, {"mixed_precision": "fp16"})
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'trainer_state.json'}: mixed_precision is 'fp16', "
                                                   "which needs a GPU: resume the run on a GPU")):
        pretrain.resolve_config(["--output_dir", str(tmp_path), "--resume", "latest"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_output_and_resume_folders_expand_the_home_folder_and_refuse_an_empty_path(script, tmp_path, monkeypatch,
                                                                                  capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve(script, ["--output_dir", "~/runs/x"]).output_dir == str(tmp_path / "runs" / "x")
    with pytest.raises(SystemExit):
        resolve(script, ["--output_dir", ""])
    assert "argument --output_dir: an empty path would be the current folder: give a folder" in capsys.readouterr().err
    resume = next(a for a in SCRIPTS[script].get_parser()._actions if a.dest == "resume")
    assert resume.type("~/runs/x/checkpoints/step-00000002") == str(tmp_path / "runs/x/checkpoints/step-00000002")


@pytest.fixture
def a_file(tmp_path):
    (tmp_path / "results.txt").write_text("not a folder")
    return tmp_path / "results.txt"


# What each script's main needs to reach its output folder (no data is read before it).
MAIN_ARGV = {"linear_eval": ["--backbone", "x", "--dataset", "digits"],
             "detect_transfer": ["--dataset", "voc", "--backbone", "random", "--arch", "resnet18", "--data_root", "."],
             "pretrain": ["--dataset", "digits"]}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("where, message", [
    ("{file}", "[Errno 17] File exists: '{file}'"),
    ("{file}/run", "[Errno 20] Not a directory: '{file}/run'"),
    ("{tmp}/read-only/run", "[Errno 13] Permission denied: '{tmp}/read-only/run'"),
])
def test_an_output_folder_that_is_a_file_or_not_writable_is_refused_in_one_line_before_any_work(
        script, where, message, a_file, tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # a read-only folder even for root, who may write anywhere
        if self.parent.name == "read-only":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    def no_work(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(Path, "mkdir", mkdir)
    for name in ("load_backbone", "load_image_split", "build_backbone"):
        monkeypatch.setattr(intl, name, no_work)
    (tmp_path / "read-only").mkdir()
    fill = {"{file}": str(a_file), "{tmp}": str(tmp_path)}
    where, message = (s.replace("{file}", fill["{file}"]).replace("{tmp}", fill["{tmp}"]) for s in (where, message))
    with pytest.raises(SystemExit) as exit_info:
        intl.run(SCRIPTS[script].main, [*MAIN_ARGV[script], "--output_dir", where])
    assert exit_info.value.code == f"error: {message}"
    assert a_file.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == [
        "read-only", "results.txt"] and not any((tmp_path / "read-only").iterdir())


def test_results_files_are_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "results.json"
    intl.write_text_atomically(target, '{"top1": 90}\n')
    assert target.read_text() == '{"top1": 90}\n'
    with pytest.raises(RuntimeError), intl.replacing(target) as tmp:
        tmp.write_text('{"top1": 9')  # a writer that fails half-way
        raise RuntimeError("disk full")
    assert target.read_text() == '{"top1": 90}\n'  # the old result, whole
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left behind
    intl.write_text_atomically(target, '{"top1": 91}\n')
    assert json.loads(target.read_text()) == {"top1": 91}


def fake_checkpoint(output_dir, step, config):
    """OUTPUT_DIR/checkpoints/step-N with the trainer_state.json a run saves (its config) and a model file."""
    folder = output_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "iteration": step, "config": config}))
    save_file({"weight": torch.zeros(1)}, folder / "model.safetensors")
    return folder


def test_a_resumed_pretraining_keeps_its_run_control_values_unless_given_again(tmp_path):
    started = pretrain.resolve_config(["--output_dir", str(tmp_path), "--log_every", "1", "--save_every", "3",
                                       "--keep", "1", "--spectrum_every", "2", "--knn_every", "0", "--num_workers",
                                       "0", "--stop_after_steps", "4"])
    fake_checkpoint(tmp_path, 4, json.loads(json.dumps(vars(started))))
    resumed = pretrain.resolve_config(["--output_dir", str(tmp_path), "--resume", "latest"])
    assert (resumed.log_every, resumed.save_every, resumed.keep, resumed.spectrum_every, resumed.knn_every,
            resumed.num_workers) == (1, 3, 1, 2, 0, 0)
    assert resumed.stop_after_steps is None  # what one command does is not carried over
    again = pretrain.resolve_config(["--output_dir", str(tmp_path), "--resume", "latest", "--log_every", "5"])
    assert again.log_every == 5 and again.save_every == 3


def test_a_resumed_detection_run_keeps_its_run_control_values_unless_given_again(tmp_path):
    started = resolve("detect_transfer", ["--output_dir", str(tmp_path), "--log_every", "1", "--save_every", "3",
                                          "--keep", "1", "--eval_batch_size", "2", "--stop_after_iters", "2"])
    fake_checkpoint(tmp_path, 2, json.loads(json.dumps(vars(started))))
    resumed = detect_transfer.resolve_config(["--output_dir", str(tmp_path), "--resume", "latest"])
    assert (resumed.log_every, resumed.save_every, resumed.keep, resumed.eval_batch_size, resumed.data_root) == \
           (1, 3, 1, 2, ".")
    assert resumed.stop_after_iters is None
    assert detect_transfer.resolve_config(["--output_dir", str(tmp_path), "--resume", "latest", "--keep", "4"]).keep == 4


@pytest.mark.parametrize("damage, message", [
    ("{", "trainer_state.json is not valid JSON (Expecting property name enclosed in double quotes: line 1"),
    ({"step": 4, "config": {"image_size": "big"}}, "trainer_state.json: image_size is 'big', must be an integer"),
    ({"step": 4, "config": {"eval_resize": -5}}, "trainer_state.json: eval_resize is -5, must be in [1, inf)"),
    ({"step": 4, "config": {"method": "intl-x"}}, "trainer_state.json: method is 'intl-x', must be one of intl, "),
    ({"step": 4}, "trainer_state.json holds no 'config' object"),
    # A saved value is named as the file's field, never as a flag this command did not get.
    ({"step": 4, "config": {"arch": "resnet999"}}, "trainer_state.json: arch is 'resnet999', must be one of resnet18"),
    ({"step": 4, "config": {"jitter": [0.4, 0.4, 0.4, 0.9]}},
     "trainer_state.json: --jitter 0.4 0.4 0.4 0.9: the hue strength must be at most 0.5; the file is damaged"),
    ({"step": 4, "config": {"small_crops": "300"}}, "trainer_state.json: small_crops is '300', must be a list of values"),
])
def test_a_damaged_trainer_state_is_named_when_resuming(tmp_path, damage, message):
    folder = fake_checkpoint(tmp_path, 4, {})
    (folder / "trainer_state.json").write_text(damage if isinstance(damage, str) else json.dumps(damage))
    with pytest.raises(ValueError, match=re.escape(message)):
        pretrain.resolve_config(["--output_dir", str(tmp_path), "--resume", str(folder)])


def test_settings_are_checked_by_the_flags_own_types_choices_and_intervals_read_as_in_maths():
    parser = argparse.ArgumentParser()
    parser.add_argument("--low", type=float)
    parser.add_argument("--high", type=float)
    parser.add_argument("--several", type=int, nargs=2)
    parser.add_argument("--kind", choices=["a", "b"])
    parser.add_argument("--flag", action="store_true")
    good = {"unset": None, "low": 0.0, "high": 1.0, "several": [1, 2], "kind": "a", "flag": True}
    intl.check_settings(good, parser, {"low": "[0, 1)", "high": "(0, 1]", "several": "[1, 2]"})
    for key, value, interval, message in (
            ("low", 0.0, "(0, 1]", "--low 0.0: must be in (0, 1]"), ("high", 1.0, "[0, 1)", "--high 1.0: must be in"),
            ("several", [1, 2], "[1, 2)", "--several 1 2: each value must be in"),
            ("several", [1], None, "--several 1: must be 2 values"), ("low", "x", None, "--low x: must be a number"),
            ("kind", "c", None, "--kind c: must be one of a, b"), ("flag", 1, None, "--flag 1: must be true or false"),
            ("low", float("nan"), "(-inf, inf)", "--low nan: must be in (-inf, inf)")):
        with pytest.raises(ValueError, match=re.escape(message)):
            intl.check_settings({key: value}, parser, {key: interval} if interval else {})
    with pytest.raises(ValueError, match=re.escape("config.json: kind is 'c', must be one of a, b; the file is")):
        intl.check_settings({"kind": "c"}, parser, {}, "config.json")


# ----------------------------------------------------------------------------- a full disk


def a_trained_linear(accelerator, width):
    model = torch.nn.Linear(width, width)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.ones(2, width)).sum().backward()
    optimizer.step()  # the momentum buffers: optimizer.bin as large as the weights
    return model


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB file system (tmpfs) at tmp_path/disk; skipped where mounting one is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs a small file system (mount -t tmpfs), which this machine does not allow")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_checkpoint_save_on_a_full_disk_fails_and_leaves_the_earlier_checkpoint_intact(small_disk):
    accelerator = Accelerator(cpu=True)
    a_trained_linear(accelerator, 512)  # a checkpoint of ~2 MiB: the first one fits, the second does not
    first = intl.save_state_atomically(accelerator, small_disk / "step-00000001", "trainer_state.json", {"step": 1}, 2)
    with pytest.raises(Exception, match="No space left on device"):
        intl.save_state_atomically(accelerator, small_disk / "step-00000002", "trainer_state.json", {"step": 2}, 2)
    assert sorted(p.name for p in small_disk.iterdir()) == ["step-00000001"]
    accelerator.load_state(str(first))  # still loads
    assert json.loads((first / "trainer_state.json").read_text()) == {"step": 1}


def test_an_export_on_a_full_disk_fails_and_leaves_the_earlier_export_unchanged(small_disk):
    write_export(small_disk / "backbone", {"w": torch.ones(4)}, {"arch": "tiny"})
    before = (small_disk / "backbone" / "model.safetensors").read_bytes()
    with pytest.raises(Exception, match="No space left on device"):
        write_export(small_disk / "backbone", {"w": torch.ones(2**20)}, {"arch": "tiny"})  # 4 MiB
    assert sorted(p.name for p in small_disk.iterdir()) == ["backbone"]
    assert (small_disk / "backbone" / "model.safetensors").read_bytes() == before


def test_a_resumes_log_rewrite_on_a_full_disk_fails_and_leaves_the_log_as_it_was(small_disk):
    log = small_disk / "log.jsonl"
    log.write_text("".join(json.dumps({"step": step, "loss": "x" * 1000}) + "\n" for step in range(2000)))  # 2 MiB
    with pytest.raises(OSError, match="No space left on device"):  # the error boundary prints it as one line
        intl.truncate_jsonl(log, 1500)
    assert [r["step"] for r in intl.read_jsonl(log)] == list(range(2000))
    assert sorted(p.name for p in small_disk.iterdir()) == ["log.jsonl"]


def test_a_save_that_fails_half_way_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    a_trained_linear(accelerator, 4)

    def fills_the_disk(folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", fills_the_disk)
    with pytest.raises(OSError, match="No space left on device"):
        intl.save_state_atomically(accelerator, tmp_path / "step-00000001", "trainer_state.json", {"step": 1}, 2)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error, line", [
    (ValueError("config.json: lr is -1, must be in (0, inf)"), "error: config.json: lr is -1, must be in (0, inf)"),
    (OSError(errno.ENOSPC, "No space left on device", "out/x"), "error: [Errno 28] No space left on device: 'out/x'"),
    (intl.UnreadableImageError("Cannot read image #3 of d (file 'a.png'): broken"),
     "error: Cannot read image #3 of d (file 'a.png'): broken"),
])
def test_the_error_boundary_turns_our_errors_into_one_line_and_a_non_zero_exit(error, line):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        intl.run(main, [])
    assert exit_info.value.code == line


def test_the_error_boundary_ends_an_interruption_with_its_line_and_status_130(capsys):
    def main(argv):
        raise intl.Interrupted("step 3", "runs/x/checkpoints/step-00000003")

    with pytest.raises(SystemExit) as exit_info:
        intl.run(main, [])
    assert exit_info.value.code == 130 and capsys.readouterr().err == (
        "interrupted at step 3; continue with --resume latest (from the last checkpoint, step-00000003)\n")


# ----------------------------------------------------------------------------- one lock, one weights check, SIGTERM

ROOT = Path(__file__).resolve().parents[1]


def tiny_pretrain(images, output_dir, *args):
    """The command line and environment of a pretraining on `images` (8 px, 4 steps per epoch), offline."""
    argv = [sys.executable, str(ROOT / "pretrain.py"), "--dataset", str(images), "--image_size", "8", "--batch_size",
            "4", "--projector", "16-16-16", "--arch", "resnet18", "--num_workers", "0", "--knn_every", "0",
            "--log_every", "1", "--save_every", "2", "--output_dir", str(output_dir), *map(str, args)]
    return argv, {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def logged_losses(output_dir):
    return {r["step"]: r["loss"] for r in intl.read_jsonl(Path(output_dir) / "log.jsonl") if "loss" in r}


def started_and_training(images, output_dir, steps=3):
    """A pretraining process of 400 steps, returned once it has logged `steps` steps."""
    import time

    argv, env = tiny_pretrain(images, output_dir, "--epochs", 100)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and len(logged_losses(output_dir)) < steps:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-3000:]
    return process


@pytest.fixture
def tiny_folder(tmp_path):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for i in range(16):
        (tmp_path / "images" / f"class_{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (8, 8, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / "images" / f"class_{i % 2}" / f"{i}.png")
    return tmp_path / "images"


@pytest.mark.slow
def test_a_second_run_on_a_folder_in_use_is_refused_at_once_naming_the_process_that_holds_it(tiny_folder, tmp_path):
    first = started_and_training(tiny_folder, tmp_path / "run")
    try:
        for extra in ([], ["--overwrite"], ["--resume", "latest"]):
            argv, env = tiny_pretrain(tiny_folder, tmp_path / "run", "--epochs", 100, *extra)
            second = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
            assert second.returncode == 1
            assert second.stderr.strip().splitlines()[-1] == (
                f"error: {tmp_path / 'run'} is in use by another run (process {first.pid}): wait for it to end, or "
                "give another --output_dir"), extra
        assert first.poll() is None  # the first run goes on, its checkpoints untouched
    finally:
        first.kill()
        first.communicate()
    argv, env = tiny_pretrain(tiny_folder, tmp_path / "run", "--resume", "latest", "--stop_after_steps", 4)
    assert subprocess.run(argv, capture_output=True, cwd=ROOT, env=env, timeout=300).returncode == 0  # kill -9 frees it


@pytest.mark.slow
def test_sigterm_stops_a_run_like_ctrl_c_and_resume_latest_continues_it_as_if_uninterrupted(tiny_folder, tmp_path):
    import signal

    process = started_and_training(tiny_folder, tmp_path / "stopped")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in stderr
    assert re.fullmatch(r"interrupted at step \d+; continue with --resume latest \(from the last checkpoint, "
                        r"step-\d{8}\)", stderr.strip().splitlines()[-1])
    stopped_at = max(logged_losses(tmp_path / "stopped"))
    for output_dir, extra in ((tmp_path / "stopped", ["--resume", "latest"]), (tmp_path / "straight", [])):
        argv, env = tiny_pretrain(tiny_folder, output_dir, "--epochs", 100, "--stop_after_steps", stopped_at + 3,
                                  *extra)
        assert subprocess.run(argv, capture_output=True, cwd=ROOT, env=env, timeout=300).returncode == 0
    resumed, straight = logged_losses(tmp_path / "stopped"), logged_losses(tmp_path / "straight")
    assert sorted(resumed) == sorted(straight) == list(range(1, stopped_at + 4))
    assert all(resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7) for step in straight)


def an_export(folder, change=None):
    """A ResNet-18 export in `folder` (weights, config.json), with `change(weights)` applied first."""
    weights = {k: v.clone() for k, v in intl.build_backbone("resnet18", "cifar").state_dict().items()}
    if change:
        change(weights)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"arch": "resnet18", "stem": "cifar", "image_size": 32}))
    return folder


@pytest.mark.parametrize("change, message", [
    (lambda w: w["bn1.running_var"].__setitem__(0, -1.0), "tensor 'bn1.running_var' holds negative variances"),
    (lambda w: w.__setitem__("conv1.weight", w["conv1.weight"].to(torch.int8)), "tensor 'conv1.weight' is torch.int8"),
    (lambda w: w.__setitem__("bn1.weight", w["bn1.weight"].bool()), "tensor 'bn1.weight' is torch.bool"),
    (lambda w: w["bn1.bias"].__setitem__(0, float("nan")), "tensor 'bn1.bias' holds 1 NaN / Inf value"),
])
def test_one_check_refuses_broken_weights_from_an_export_and_from_a_checkpoint(tmp_path, change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        intl.load_backbone(an_export(tmp_path / "export", change))
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))
    accelerator.save_state(str(tmp_path / "checkpoint"))
    save_file(load_file(tmp_path / "export" / "model.safetensors"), tmp_path / "checkpoint" / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(message)):
        intl.load_state(accelerator, tmp_path / "checkpoint")


@pytest.mark.parametrize("field, value, message", [
    ("image_size", -5, "config.json: image_size is -5, must be in [1, inf)"),
    ("eval_resize", -5, "config.json: eval_resize is -5, must be in [1, inf)"),
    ("stem", "tiny", "config.json: stem is 'tiny', must be one of imagenet, cifar"),
    ("std", [0.2, 0.0, 0.2], "config.json: std is [0.2, 0.0, 0.2], each value must be in (0, inf)"),
    ("mean", [0.5, 0.5], "config.json: mean is [0.5, 0.5], must be 3 values"),
])
def test_a_bad_value_in_an_exports_config_is_refused_naming_the_file_and_the_field(tmp_path, field, value, message):
    export = an_export(tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=re.escape(message)):
        intl.load_backbone(export)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_refuses_an_output_folder_another_run_holds_before_reading_anything(tmp_path, script):
    with intl.locked(tmp_path / "out"):  # another open file description of .lock: as another process would hold it
        with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'out'} is in use by another run (process "
                                                       f"{os.getpid()})")):
            SCRIPTS[script].main([*MAIN_ARGV[script], "--output_dir", str(tmp_path / "out")])
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".lock"]

