"""On a CUDA GPU (skipped elsewhere): every method in float32, fp16 and bf16; the device augmentations equal
the CPU's; IterNorm stays float32 under autocast; a deterministic resume; linear_eval and a detect_transfer step.
`.ci/gpu-check` runs this module on a GPU machine."""

import json
import os

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import detect_transfer as dt
import intl
import pretrain
from test_detect import SMALL, write_coco
from test_linear_eval import TINY, evaluate, folder  # noqa: F401 (folder: a fixture)
from test_pretrain import losses, tiny, tiny_images  # noqa: F401 (tiny_images: a fixture)

# Deterministic cuBLAS needs this before its first use in the process (the resume test below).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run .ci/gpu-check there)")


def accelerator_with(precision):
    """A new Accelerator in this process (Accelerate keeps one state per process: it is reset first)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=precision)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
@pytest.mark.parametrize("method", pretrain.METHODS)
def test_every_method_trains_in_every_precision_with_a_finite_falling_loss_on_a_fixed_batch(method, precision):
    # Sub-batches whose covariances can have full rank: 32 samples per CW-RGP group of 64 channels, 64 for W-MSE's 32.
    full_rank = {"cw-rgp": ["--w_size", "32"], "wmse": ["--w_size", "64", "--projector", "256-256-32"]}
    config = pretrain.resolve_config(["--benchmark", "1", "--method", method, "--arch", "resnet18", "--stem", "cifar",
                                      "--image_size", "32", "--batch_size", "64", "--projector", "256-256-256",
                                      *full_rank.get(method, [])])
    accelerator = accelerator_with(precision)
    torch.manual_seed(0)
    model = pretrain.on_the_accelerator(pretrain.build_model(config), config, accelerator.device)
    model, optimizer = accelerator.prepare(model, pretrain.build_optimizer(config, model))
    for group in optimizer.param_groups:
        group["lr"] = 0.05
    views = [torch.rand(64, 3, 32, 32, device="cuda") for _ in range(2)]
    watch = pretrain.NonFiniteWatch(accelerator.device)
    curve = []
    for step in range(12):
        if method == "intl-m":
            accelerator.unwrap_model(model).update_target(0.99)
        out = model(views, step=step) if method in ("cw-rgp", "wmse") else model(views)
        watch.record(out["loss"], step)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(out["loss"])
        optimizer.step()
        curve.append(out["loss"].item())
    watch.check(None)
    assert out["z_hat"].dtype == torch.float32  # the whitening islands run in float32 under autocast
    assert curve[-1] < curve[0], curve


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_iternorm_stays_float32_under_autocast_and_equals_the_float32_result(dtype):
    z = torch.randn(256, 64, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = intl.IterNorm(iters=4)(z)
        loss = intl.trace_loss(out)
    assert out.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(out, intl.IterNorm(iters=4)(z), rtol=1e-5, atol=1e-5)


def test_a_resumed_run_on_the_gpu_continues_the_uninterrupted_loss_curve(tiny_images, tmp_path):  # noqa: F811
    # Without deterministic kernels two runs differ in the last bits (cuDNN's choices, atomic sums), and whitening
    # batches of 4 amplifies that to percents within 4 steps (seen on an H200): compare deterministic runs.
    flags = ["--epochs", 2, "--save_every", 2, "--log_every", 1]
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        tiny(tiny_images, "--output_dir", tmp_path / "whole", *flags)
        AcceleratorState._reset_state(reset_partial_state=True)
        tiny(tiny_images, "--output_dir", tmp_path / "resumed", *flags, "--stop_after_steps", 4)
        AcceleratorState._reset_state(reset_partial_state=True)
        tiny(tiny_images, "--output_dir", tmp_path / "resumed", *flags, "--resume", "latest")
    finally:
        torch.use_deterministic_algorithms(False)
    whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert sorted(whole) == sorted(resumed) == list(range(1, 9))
    assert [resumed[step] for step in whole] == pytest.approx(list(whole.values()), rel=1e-5, abs=1e-6)
    assert (tmp_path / "resumed" / "backbone" / "model.safetensors").is_file()


def test_linear_eval_runs_its_protocols_on_the_gpu(tiny_images, folder, tmp_path):  # noqa: F811
    tiny(tiny_images, "--output_dir", tmp_path / "pretrain", "--epochs", 1)
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.cuda.reset_peak_memory_stats()
    records = evaluate("--backbone", tmp_path / "pretrain" / "backbone", "--dataset", folder, "--protocol", "knn",
                       "linear", "--output_dir", tmp_path / "eval", *TINY, "--epochs", "2")
    assert torch.cuda.max_memory_allocated() > 0
    assert records["linear"]["backbone_unchanged"] is True and records["linear"]["final_epoch"] == 2
    assert all(0 <= record["rows"][0]["top1"] <= 100 for record in records.values())


@pytest.mark.parametrize("model_name", dt.MODELS)
def test_detect_transfer_trains_and_evaluates_on_the_gpu_in_fp16(model_name, tmp_path):
    root = write_coco(tmp_path / "coco", n_train=6, n_val=3)
    torch.cuda.reset_peak_memory_stats()
    dt.main([str(a) for a in SMALL + [
        "--dataset", "coco", "--data_root", root, "--model", model_name, "--backbone", "random", "--arch", "resnet18",
        "--batch_size", 2, "--iterations", 2, "--warmup_iters", 1, "--lr_steps",
        "--precise_bn", 1, "--mixed_precision", "fp16",
        "--output_dir", tmp_path / "run"]])
    assert torch.cuda.max_memory_allocated() > 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["bbox"]["AP"] is not None and results["test_images"] == 3
