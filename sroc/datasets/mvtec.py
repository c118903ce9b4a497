"""MVTec AD: download or local archive, extracted safely, or an existing extracted copy."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from sroc.datasets.archives import ArchiveMember, extract_members, open_archive
from sroc.datasets.download import download_file, verify_sha256
from sroc.datasets.folders import refuse_existing
from sroc.datasets.layout import DatasetError, list_categories

MVTEC_AD_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
    "420938113-1629952094/mvtec_anomaly_detection.tar.xz"
)
# The hash anomalib pins for this URL (DOWNLOAD_INFO of its MVTec AD datamodule); not verified
# by this project, which cannot download the archive. A mismatch error prints the actual hash.
MVTEC_AD_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_AD_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)


def _locate_categories(
    members: Sequence[ArchiveMember], categories: Sequence[str], archive: Path
) -> tuple[str, ...]:
    """The folder inside the archive that holds the category folders (() for the top)."""
    roots: dict[tuple[str, ...], set[str]] = {}
    for member in members:
        for i in range(1, len(member.parts)):
            if member.parts[i] in ("train", "test"):
                roots.setdefault(member.parts[: i - 1], set()).add(member.parts[i - 1])
    if not roots:
        raise DatasetError(
            f"{archive}: no folder <category>/train or <category>/test inside. Fix: check that "
            "this is the MVTec AD archive."
        )
    # The root holding most of the requested categories; then most categories; then shallowest.
    root = max(roots, key=lambda r: (len(roots[r] & set(categories)), len(roots[r]), -len(r)))
    missing = [c for c in categories if c not in roots[root]]
    if missing:
        raise DatasetError(
            f"{archive}: categories {', '.join(missing)} are missing (found "
            f"{', '.join(sorted(roots[root]))}). Fix: use the complete archive or list only the "
            "available categories in the config."
        )
    return root


def prepare_mvtec(
    target: str | os.PathLike,
    archive: str | os.PathLike | None = None,
    source_root: str | os.PathLike | None = None,
    url: str = MVTEC_AD_URL,
    sha256: str | None = MVTEC_AD_SHA256,
    categories: Sequence[str] = MVTEC_AD_CATEGORIES,
    progress: bool = True,
) -> Path:
    """Put MVTec AD at ``target`` (``target/<category>/train/good``, ...) and return it.

    - ``source_root``: an already extracted copy; its categories are checked and ``target``
      becomes a symlink to it (nothing is copied).
    - ``archive``: a local copy of the archive, verified against ``sha256`` (None: hash logged).
    - neither: the archive is downloaded from ``url`` to ``<target>.tar.xz`` first (kept, so a
      rebuild needs no second download).

    Only the listed ``categories`` are extracted, with the archive's loose files (licence,
    readme); a wrapping folder inside the archive is removed.
    """
    target = Path(target)
    categories = list(categories)
    if source_root is not None:
        source_root = Path(source_root).expanduser().absolute()
        present = list_categories(source_root)
        missing = [c for c in categories if c not in present]
        if missing:
            raise DatasetError(
                f"{source_root}: categories {', '.join(missing)} are missing. Fix: point the "
                "config at the folder holding all category folders, or list fewer categories."
            )
        refuse_existing(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        link = target.with_name(f".{target.name}.link")
        link.unlink(missing_ok=True)
        link.symlink_to(source_root, target_is_directory=True)
        if target.is_dir():
            target.rmdir()
        os.replace(link, target)
        return target
    if archive is None:
        archive = download_file(
            url, target.with_name(f"{target.name}.tar.xz"), sha256=sha256, progress=progress
        )
    else:
        verify_sha256(archive, sha256)
    archive = Path(archive)
    with open_archive(archive) as (_, members, _handle):
        root = _locate_categories(members, categories, archive)
    return extract_members(archive, target, select_root=root, subfolders=categories)
