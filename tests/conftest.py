"""Fixtures shared by the test modules (pytest hands them to any test that names them; no import).

Plain helpers that tests call themselves (``train``, ``ok``, ``user_error``, ``TINY``, ``PYTHON``,
``ROOT``, ``Launcher``, ...) are in ``tests/helpers.py``: ``from tests.helpers import ...``; the
sweep tests' own (``tiny_spec``, ``sweep_cli``) in ``tests/sweep_helpers.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_dataset


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """6,000 synthetic rows (train/val/test 8/1/1), 39 sparse fields, oracle metrics in schema.json."""
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's in-process tests: the machine's cores are
    shared, and small ops run faster on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
