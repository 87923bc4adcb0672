"""Shared fixtures: the real CIFAR-10 archive from ../shared, decoded once per session."""

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
