"""Where the local files of a dataset are looked for (nothing is ever downloaded).

The folders are searched in this order; the first that holds every expected file wins:

1. ``data_dir`` (``DataConfig.data_dir``, ``--data-dir``);
2. the dataset's environment variable :data:`ENV_VARS` (``STABLEFLOWS_FASHION_MNIST_DIR``,
   ``STABLEFLOWS_MNIST_DIR``, ``STABLEFLOWS_CIFAR10_DIR``, ``STABLEFLOWS_SVHN_DIR``);
3. ``STABLEFLOWS_DATA_DIR`` (:data:`GENERIC_ENV`), a root shared by every dataset;
4. the folder where a system package installs it, :data:`PACKAGES` (Fashion-MNIST: Debian's
   ``dataset-fashion-mnist`` puts the original IDX files in ``/usr/share/datasets/fashion-mnist``).

Each of these roots is searched with the dataset's sub-folders (``ROOT/fashion-mnist``,
``ROOT/FashionMNIST/raw``, ``ROOT``: :data:`stableflows.data.files.SUBDIRS`). A root given by the
user (1-3) that does not exist is an error, so that a mistyped path never falls through to other
files; one that exists but lacks the files is passed over. When no folder holds them all,
:class:`~.errors.DatasetNotFound` names the expected files, every folder searched and what each
lacks, and how to get them (for Fashion-MNIST: ``apt-get install dataset-fashion-mnist``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetNotFound

__all__ = ["ENV_VARS", "GENERIC_ENV", "PACKAGES", "Package", "search_roots", "locate", "install_hint"]

GENERIC_ENV = "STABLEFLOWS_DATA_DIR"
ENV_VARS = {
    "mnist": "STABLEFLOWS_MNIST_DIR",
    "fashion-mnist": "STABLEFLOWS_FASHION_MNIST_DIR",
    "cifar10": "STABLEFLOWS_CIFAR10_DIR",
    "svhn": "STABLEFLOWS_SVHN_DIR",
}


@dataclass(frozen=True)
class Package:
    """A system package that installs a dataset's files into ``folder``."""

    name: str  # the apt package
    folder: str

    @property
    def command(self) -> str:
        return f"apt-get install {self.name}"


PACKAGES = {"fashion-mnist": Package("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist")}


def search_roots(dataset: str, data_dir: str | Path | None) -> list[tuple[Path, str, bool]]:
    """The roots to search, in order: ``(folder, where it came from, given by the user)``."""
    roots: list[tuple[Path, str, bool]] = []
    if data_dir is not None:
        roots.append((Path(data_dir).expanduser(), "data_dir", True))
    for var in (ENV_VARS.get(dataset), GENERIC_ENV):
        value = os.environ.get(var) if var else None
        if value:
            roots.append((Path(value).expanduser(), f"${var}", True))
    if dataset in PACKAGES:
        roots.append((Path(PACKAGES[dataset].folder), f"package {PACKAGES[dataset].name}", False))
    return roots


def install_hint(dataset: str) -> str:
    """How to get the files: the apt command where a package exists, the settings that point to them."""
    env = f"${ENV_VARS[dataset]} or ${GENERIC_ENV}" if dataset in ENV_VARS else f"${GENERIC_ENV}"
    pkg = PACKAGES.get(dataset)
    place = f"place them in a folder and pass it as --data-dir (data.data_dir) or set {env}"
    get = f"Install them with `{pkg.command}` (they go to {pkg.folder}), or {place}" if pkg else place[0].upper() + place[1:]
    return f"{get}; stableflows never downloads data."


def _candidates(directory: Path, name: str, gz: bool) -> list[Path]:
    return [directory / name] + ([directory / (name + ".gz")] if gz else [])


def locate(dataset: str, data_dir: str | Path | None, names: tuple[str, ...], *, subdirs: tuple[str, ...],
           gz: bool) -> dict[str, Path]:
    """Paths of ``names`` (each optionally ``.gz`` when ``gz``) in the first folder that holds them all.

    The folders are ``root/sub`` for each root of :func:`search_roots` and each ``sub`` of
    ``subdirs`` (``"."``: the root itself). Raises :class:`DatasetNotFound` otherwise.
    """
    expected = ", ".join(names) + (" (each optionally .gz)" if gz else "")
    roots = search_roots(dataset, data_dir)
    searched: list[str] = []
    for root, source, given in roots:
        if not root.is_dir():
            if given:
                raise DatasetNotFound(f"{dataset}: {source} {root} does not exist or is not a folder; expected the "
                                      f"files {expected}. {install_hint(dataset)}")
            searched.append(f"{root} ({source}: no such folder)")
            continue
        for sub in subdirs:
            d = root / sub if sub != "." else root
            found = {n: next((p for p in _candidates(d, n, gz) if p.is_file()), None) for n in names}
            if all(found.values()):
                return found  # type: ignore[return-value]
            lacks = ", ".join(n for n, p in found.items() if p is None)
            searched.append(f"{d} lacks {lacks}" if d.is_dir() else f"{d} (no such folder)")
    if not any(given for _, _, given in roots):
        searched.insert(0, "no data_dir given" + (f", ${ENV_VARS[dataset]}" if dataset in ENV_VARS else "")
                        + f" and ${GENERIC_ENV} unset")
    raise DatasetNotFound(f"{dataset}: expected the files {expected} in one folder; searched: {'; '.join(searched)}. "
                          f"{install_hint(dataset)}")
