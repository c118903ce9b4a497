"""Folders built in a hidden temporary folder beside the target and renamed into place at the
end, so an interrupted job never leaves a half-built dataset that a later run would take for
finished.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sroc.datasets.layout import DatasetError


def refuse_existing(target: Path) -> None:
    """Raise DatasetError unless ``target`` is absent or an empty folder (not a symlink)."""
    if target.is_symlink() or (
        target.exists() and not (target.is_dir() and not any(target.iterdir()))
    ):
        raise DatasetError(
            f"{target}: already exists. Fix: delete it to build it again, or name it as an "
            "existing dataset in the config."
        )


def publish_directory(built: Path, target: Path) -> None:
    """Rename the finished folder ``built`` onto ``target`` (absent or an empty folder)."""
    refuse_existing(target)
    if target.is_dir():
        target.rmdir()
    os.rename(built, target)


@contextmanager
def building_directory(target: Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``target``; removed on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".building", dir=target.parent)
    )
    try:
        yield building
    finally:
        shutil.rmtree(building, ignore_errors=True)
