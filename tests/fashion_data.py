"""The skip marker of tests that read the real Fashion-MNIST files (Debian's ``dataset-fashion-mnist``).

Without the files such a test is skipped with the apt command in its reason, unless
``STABLEFLOWS_REQUIRE_FASHION_MNIST=1`` (``.ci/run`` sets it): then importing this module fails, so CI
can never pass by skipping them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
APT = "apt-get install dataset-fashion-mnist"
REQUIRE = os.environ.get("STABLEFLOWS_REQUIRE_FASHION_MNIST") == "1"


def have_package() -> bool:
    return all((PACKAGE_DIR / f"{n}.gz").is_file() or (PACKAGE_DIR / n).is_file() for n in NAMES)


WHY = f"Fashion-MNIST IDX files not found in {PACKAGE_DIR}: install them with `sudo {APT}` (or `make data`)"
if REQUIRE and not have_package():
    raise RuntimeError(f"STABLEFLOWS_REQUIRE_FASHION_MNIST=1 but {WHY}")
needs_fashion_mnist = pytest.mark.skipif(not have_package(), reason=WHY)
