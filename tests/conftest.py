"""Shared test setup: make the repository root importable (`import intl`) and keep runs deterministic."""

import os
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
def digits_run(tmp_path_factory):
    """The README's first run, `pretrain.py --output_dir DIR` (the digits preset), at test_pretrain's reduced budget
    (SMALL, 2 epochs), the 5-NN every epoch, a checkpoint every 5 steps, in its own process: (DIR, the process).
    test_pretrain checks the run; test_linear_eval evaluates it as the README's next step does."""
    from test_pretrain import SMALL, run

    output_dir = tmp_path_factory.mktemp("digits")
    result = run("--output_dir", output_dir, *SMALL, "--epochs", "2", "--knn_every", "1", "--save_every", "5")
    return output_dir, result


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts real processes (a script's command line, Ctrl-C, several "
                                       "processes), itself or through a fixture, or trains for over a minute; "
                                       "deselect with -m 'not slow' (a loop of a minute or two)")
