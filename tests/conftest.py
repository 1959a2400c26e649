"""Shared test set-up: one torch thread (see benchmarks/README.md), CIFAR-10 location."""
import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def cifar10_path():
    """Path of CIFAR-10 (zip, image folder or python batches) from ``LESDE_CIFAR10``."""
    path = os.environ.get("LESDE_CIFAR10", "")
    if not path or not os.path.exists(path):
        pytest.skip(
            "CIFAR-10 not found: set LESDE_CIFAR10 to cifar10-jpeg.zip, an image-folder "
            "directory, or a cifar-10-batches-py directory (e.g. "
            "LESDE_CIFAR10=../shared/data/cifar10/cifar10-jpeg.zip make test)"
        )
    return path
