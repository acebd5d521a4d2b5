"""Shared test setup: make the repository root importable (`import intl`) and keep runs deterministic."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    yield


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts real processes (a script's command line, Ctrl-C, several "
                                       "processes); deselect with -m 'not slow'")
