"""Shared fixtures: the real CIFAR-10 archive from ../shared, decoded once per session.

Tests are marked by what they need (``pytest -m "not service and not browser and not cifar"`` is
``make test-fast``): ``service`` for everything under tests/service and tests/ui (Redis, PostgreSQL,
live servers), ``browser`` for the console's Chromium tests, ``cifar`` for any test that reaches the
CIFAR-10 archive through a fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clipguard.data import ImageData, load_data
from clipguard.models import resolve_spec

ROOT = Path(__file__).resolve().parents[1]
CIFAR10_ARCHIVE = Path(os.environ.get("CLIPGUARD_CIFAR10", ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"))

torch.set_num_threads(min(2, os.cpu_count() or 1))

CIFAR_FIXTURES = {"cifar_archive", "cifar10"}
"""Fixtures that open the CIFAR-10 archive (tests/conftest.py, tests/service/conftest.py)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.path)).relative_to(ROOT).parts
        if parts[:2] in (("tests", "service"), ("tests", "ui")):
            item.add_marker(pytest.mark.service)
        if parts[:3] == ("tests", "ui", "test_console.py"):
            item.add_marker(pytest.mark.browser)
        if CIFAR_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cifar)


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    if not CIFAR10_ARCHIVE.exists():
        pytest.fail(f"CIFAR-10 archive not found at {CIFAR10_ARCHIVE}; set CLIPGUARD_CIFAR10")
    return CIFAR10_ARCHIVE


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture(scope="session")
def cifar_train(cifar_archive, data_cache) -> ImageData:
    return load_data(f"{cifar_archive}#train", cache_dir=data_cache)


@pytest.fixture(scope="session")
def cifar_test(cifar_archive, data_cache) -> ImageData:
    return load_data(f"{cifar_archive}#test", cache_dir=data_cache)


@pytest.fixture(scope="session")
def model_file(tmp_path_factory) -> Path:
    """Freshly initialised small_cnn weights (seed 0) as safetensors."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "small_cnn.safetensors"
    save_file(resolve_spec("small_cnn").build().state_dict(), str(path))
    return path
