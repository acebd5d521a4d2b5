"""Shared test setup: make the repository root importable (`import intl`) and keep runs deterministic."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One thread, here and in the scripts the tests start (their helpers pass OMP_NUM_THREADS): these small networks gain
# little from a second thread, and on 2 cores shared with another process two threads run several times slower
# (measured: a ResNet-18 step on 8 images of 16 px, 0.2 s on one thread, 0.9 s on two).
THREADS = 1
torch.set_num_threads(THREADS)  # module and session fixtures run before the per-test fixture below


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(THREADS)
    yield


@pytest.fixture(scope="session")
def digits_split():
    """digits_split(name): `intl.load_image_split("digits", name)`, loaded (and PNG-encoded: ~0.5 s for the 1437
    training images) once per session. Each call returns a new ImageSplit around the same datasets.Dataset, which no
    code changes in place (its methods return new datasets). For tests that need the digits as input data; the tests
    of loading itself (test_data) also load them afresh where loading is what they check."""
    import dataclasses

    import intl

    loaded = {}

    def split(name):
        if name not in loaded:
            loaded[name] = intl.load_image_split("digits", name)
        return dataclasses.replace(loaded[name])

    return split


@pytest.fixture(scope="session")
def tiny_finished_run(tmp_path_factory):
    """A finished pretraining run in this process, shared by test_pretrain (finished_run, and what a run prints),
    test_linear_eval (pretrained) and test_hub, which only read it (or change copies of it): test_pretrain's tiny run
    (`tiny_args`: a ResNet-18 at 8 px, batch 4) on its 16 generated 8 x 8 images in 2 classes, in
    ROOT/my-private-photos, for 1 epoch of 4 steps saved every 2 steps: RUN with checkpoints/ (steps 2 and 4),
    backbone/ (weights, config.json and the model card), log.jsonl and spectrum.png. Returns a namespace: root (ROOT),
    images, run (RUN) and stdout (what the run printed)."""
    import contextlib
    import io
    import types

    from test_pretrain import tiny, write_tiny_images

    root = tmp_path_factory.mktemp("tiny-run")
    images = write_tiny_images(root / "my-private-photos")
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        tiny(images, "--output_dir", root / "run", "--epochs", 1, "--save_every", 2)
    return types.SimpleNamespace(root=root, images=images, run=root / "run", stdout=stdout.getvalue())


# 4 epochs, not fewer: its 5-NN must beat initialisation on any machine. Seeds 0 and 1 gave 53% at initialisation,
# 67.2-75.0% after 4 epochs; after 2 epochs 58-62%, with a dip below 53% after the first.
DIGITS_RUN = ["--epochs", "4", "--knn_every", "1", "--save_every", "5"]  # after test_pretrain's SMALL


@pytest.fixture(scope="session")
def digits_run(_digits_run_started):
    """The README's first run, `pretrain.py --output_dir DIR` (the digits preset), at test_pretrain's reduced budget
    (SMALL, 4 epochs), the 5-NN every epoch, a checkpoint every 5 steps, in its own process: (DIR, the finished
    process). test_pretrain checks the run; test_linear_eval evaluates it as the README's next step does."""
    from test_pretrain import checked

    output_dir, process, logs = _digits_run_started
    process.wait(timeout=1200)
    return output_dir, checked(subprocess.CompletedProcess(process.args, process.returncode,
                                                           (logs / "stdout").read_text(), (logs / "stderr").read_text()))


@pytest.fixture(scope="session", autouse=True)
def _digits_run_started(request, tmp_path_factory):
    """The digits run lasts a minute or more on one thread: when a selected test needs it, it starts with the session
    and runs on the second core while the tests before it run (its first user, test_linear_eval, comes minutes in)."""
    if not any("digits_run" in item.fixturenames for item in request.session.items):
        yield None
        return
    from test_pretrain import SMALL, command

    output_dir, logs = tmp_path_factory.mktemp("digits"), tmp_path_factory.mktemp("digits-output")
    argv, env = command("--output_dir", output_dir, *SMALL, *DIGITS_RUN)
    with open(logs / "stdout", "w") as stdout, open(logs / "stderr", "w") as stderr:
        process = subprocess.Popen(argv, stdout=stdout, stderr=stderr, text=True, cwd=ROOT, env=env)
    try:
        yield output_dir, process, logs
    finally:
        if process.poll() is None:  # the session ended before a test needed it (-x, Ctrl-C)
            process.kill()
            process.wait()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts real processes (a script's command line, Ctrl-C, several "
                                       "processes), itself or through a fixture, or runs a stage end to end for "
                                       "seconds (pretraining, an evaluation protocol, detection); deselect with "
                                       "-m 'not slow' for a quick loop")


def write_export(folder, weights, config):
    """intl.write_export with what a test's config leaves out filled in as an export of this project has it: an
    ImageNet-stem ResNet-18 at 224 px with ImageNet's normalisation, or with a small-image stem 32 px and CIFAR's."""
    import intl

    small = config.get("stem", "imagenet") != "imagenet"
    defaults = {"arch": "resnet18", "stem": "imagenet", "image_size": 32 if small else 224,
                "mean": list(intl.CIFAR_MEAN if small else intl.IMAGENET_MEAN),
                "std": list(intl.CIFAR_STD if small else intl.IMAGENET_STD)}
    intl.write_export(folder, weights, {**defaults, **config})
    return folder
