"""The rules every script follows: numeric flags range-checked up front, output folders checked before any work,
results files replaced whole or not at all (a full disk included), resumed runs keeping their run-control values."""

import argparse
import errno
import json
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file

import detect_transfer
import intl
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


# Flags checked by their own rule rather than by the script's RANGES table.
CHECKED_ELSEWHERE = {"pretrain": {"batch_size", "min_scale"}, "linear_eval": set(), "detect_transfer": set()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_of_every_script_has_a_checked_range(script):
    module = SCRIPTS[script]
    numeric = {a.dest for a in module.get_parser()._actions if a.type in (int, float) and not a.choices}
    assert numeric - set(module.RANGES) - CHECKED_ELSEWHERE[script] == set()


@pytest.mark.parametrize("script, argv, message", [
    ("pretrain", ["--momentum", "2"], "--momentum 2.0: must be in [0, 1]"),
    ("pretrain", ["--lr", "-1"], "--lr -1.0: must be greater than 0"),
    ("pretrain", ["--beta", "nan"], "--beta nan: must be at least 0"),
    ("pretrain", ["--image_size", "0"], "--image_size 0: must be at least 1"),
    ("pretrain", ["--std", "0.2", "0", "0.2"], "--std 0.2 0.0 0.2: each value must be greater than 0"),
    ("pretrain", ["--mean", "0.5", "inf", "0.5"], "--mean 0.5 inf 0.5: each value must be a finite number"),
    ("pretrain", ["--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
    ("pretrain", ["--w_size", "1"], "--w_size 1: must be at least 2"),
    ("pretrain", ["--warmup_epochs", "-1"], "--warmup_epochs -1.0: must be at least 0"),
    ("pretrain", ["--num_workers", "-1"], "--num_workers -1: must be at least 0"),
    ("pretrain", ["--small_crops", "96,300", "--image_size", "224"], "--small_crops '96,300': every side"),
    ("pretrain", ["--study", "trace", "--study_values", "1,2.5"], "--study_values '1,2.5': give iteration counts"),
    ("linear_eval", ["--temperature", "0"], "--temperature 0.0: must be greater than 0"),
    ("linear_eval", ["--min_lr", "-1"], "--min_lr -1.0: must be at least 0"),
    ("linear_eval", ["--milestones", "0.6", "1.5"], "--milestones 0.6 1.5: each value must be in [0, 1]"),
    ("linear_eval", ["--lr", "-1"], "--lr -1.0: must be greater than 0"),
    ("linear_eval", ["--image_size", "0"], "--image_size 0: must be at least 1"),
    ("linear_eval", ["--k", "5", "0"], "--k 5 0: each value must be at least 1"),
    ("detect_transfer", ["--momentum", "1.5"], "--momentum 1.5: must be in [0, 1)"),
    ("detect_transfer", ["--score_thresh", "2"], "--score_thresh 2.0: must be in [0, 1]"),
    ("detect_transfer", ["--lr", "0"], "--lr 0.0: must be greater than 0"),
    ("detect_transfer", ["--warmup_factor", "-0.1"], "--warmup_factor -0.1: must be in [0, 1]"),
    ("detect_transfer", ["--lr_steps", "-5"], "--lr_steps -5: each value must be at least 0"),
    ("detect_transfer", ["--train_sizes", "0", "96"], "--train_sizes 0 96: each value must be at least 1"),
])
def test_out_of_range_flags_are_refused_naming_the_flag_and_its_range(script, argv, message, tmp_path):
    with pytest.raises(ValueError) as info:
        resolve(script, ["--output_dir", str(tmp_path), *argv])
    assert str(info.value).startswith(message)


@pytest.fixture
def a_file(tmp_path):
    (tmp_path / "results.txt").write_text("not a folder")
    return tmp_path / "results.txt"


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("where, message", [
    ("{file}", "{file} is a file, not a folder"),
    ("{file}/run", "{file}/run lies inside {file}, which is a file"),
    ("{tmp}/read-only/run", "{tmp}/read-only/run: cannot write in {tmp}/read-only (Permission denied)"),
])
def test_an_output_folder_that_is_a_file_or_not_writable_is_refused_before_any_work(
        script, where, message, a_file, tmp_path, monkeypatch):
    (tmp_path / "read-only").mkdir()
    real_temporary_file = intl.tempfile.TemporaryFile

    def temporary_file(dir=None, **kwargs):  # a read-only folder even for root, who may write anywhere
        if str(dir).endswith("read-only"):
            raise PermissionError(13, "Permission denied")
        return real_temporary_file(dir=dir, **kwargs)

    monkeypatch.setattr(intl.tempfile, "TemporaryFile", temporary_file)
    fill = {"{file}": str(a_file), "{tmp}": str(tmp_path)}
    where, message = (s.replace("{file}", fill["{file}"]).replace("{tmp}", fill["{tmp}"]) for s in (where, message))
    with pytest.raises(ValueError, match="^--output_dir " + message.replace("(", r"\(").replace(")", r"\)")):
        resolve(script, ["--output_dir", where])


def test_linear_eval_refuses_an_output_file_before_loading_anything(a_file, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("the evaluation started")

    monkeypatch.setattr(linear_eval.intl, "load_backbone", no_work)
    with pytest.raises(ValueError, match="is a file, not a folder"):
        linear_eval.main(["--backbone", "x", "--output_dir", str(a_file)])


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
    ({"step": 4, "config": {"image_size": "big"}}, "the configuration has image_size = 'big', but image_size takes values like 32"),
    ({"step": 4}, "trainer_state.json holds no 'config' object"),
])
def test_a_damaged_trainer_state_is_named_when_resuming(tmp_path, damage, message):
    folder = fake_checkpoint(tmp_path, 4, {})
    (folder / "trainer_state.json").write_text(damage if isinstance(damage, str) else json.dumps(damage))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        pretrain.resolve_config(["--output_dir", str(tmp_path), "--resume", str(folder)])


def test_check_ranges_reads_intervals_as_in_maths():
    config = argparse.Namespace(unset=None, ok=0.5, low=0.0, high=1.0, several=[1, 2])
    intl.check_ranges(config, {"unset": "(0, 1)", "ok": "(0, 1)", "low": "[0, 1)", "high": "(0, 1]",
                               "several": "[1, 2]"})
    for flag, interval in (("low", "(0, 1]"), ("high", "[0, 1)"), ("several", "[1, 2)")):
        with pytest.raises(ValueError, match=f"--{flag} "):
            intl.check_ranges(config, {flag: interval})


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


def test_a_checkpoint_save_on_a_full_disk_says_so_and_leaves_the_earlier_checkpoint_intact(small_disk):
    accelerator = Accelerator(cpu=True)
    a_trained_linear(accelerator, 512)  # a checkpoint of ~2 MiB: the first one fits, the second does not
    first = intl.save_state_atomically(accelerator, small_disk / "step-00000001", "trainer_state.json", {"step": 1}, 2)
    with pytest.raises(ValueError, match=r"no space left on the device while writing the checkpoint .*step-00000002 .*"
                                         r"the partial copy was removed and the earlier checkpoints \(step-00000001\) "
                                         r"are intact"):
        intl.save_state_atomically(accelerator, small_disk / "step-00000002", "trainer_state.json", {"step": 2}, 2)
    assert sorted(p.name for p in small_disk.iterdir()) == ["step-00000001"]
    accelerator.load_state(str(first))  # still loads
    assert json.loads((first / "trainer_state.json").read_text()) == {"step": 1}


def test_an_export_on_a_full_disk_says_so_and_leaves_the_earlier_export_unchanged(small_disk):
    pretrain.write_export(small_disk / "backbone", {"w": torch.ones(4)}, {"arch": "tiny"})
    before = (small_disk / "backbone" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"no space left on the device while writing the export .*backbone .*"
                                         r"backbone is unchanged"):
        pretrain.write_export(small_disk / "backbone", {"w": torch.ones(2**20)}, {"arch": "tiny"})  # 4 MiB
    assert sorted(p.name for p in small_disk.iterdir()) == ["backbone"]
    assert (small_disk / "backbone" / "model.safetensors").read_bytes() == before


def test_a_full_disk_reported_only_by_its_error_number_is_recognised_too(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    a_trained_linear(accelerator, 4)

    def fills_the_disk(folder):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", fills_the_disk)
    with pytest.raises(ValueError, match="no space left on the device .* no checkpoint was saved yet"):
        intl.save_state_atomically(accelerator, tmp_path / "step-00000001", "trainer_state.json", {"step": 1}, 2)
    assert list(tmp_path.iterdir()) == []
