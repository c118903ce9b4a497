"""Dataset sources, each delivered in the MVTec AD folder layout.

That layout is read and checked by :mod:`sroc.datasets.layout`.

- MVTec AD (:mod:`sroc.datasets.mvtec`): :func:`download_file` (streaming, resumable,
  sha256-verified, :mod:`sroc.datasets.download`), then :func:`extract_archive_safely`
  (:mod:`sroc.datasets.archives`) or :func:`prepare_mvtec`.
- elpv (PyPI package ``elpv-dataset``, :mod:`sroc.datasets.elpv`): :func:`prepare_elpv`.
- A seeded synthetic texture dataset with defects and masks (:mod:`sroc.datasets.synthetic`):
  :func:`make_synthetic_dataset`.

Every function that creates a folder builds it in a hidden temporary folder beside the target and
renames it into place at the end (:mod:`sroc.datasets.folders`), so an interrupted job never
leaves a half-built dataset that a later run would take for finished.
"""

from sroc.datasets.archives import UnsafeArchiveError, extract_archive_safely
from sroc.datasets.download import DownloadError, download_file, file_sha256, verify_sha256
from sroc.datasets.elpv import elpv_defect_type, prepare_elpv
from sroc.datasets.mvtec import (
    MVTEC_AD_CATEGORIES,
    MVTEC_AD_SHA256,
    MVTEC_AD_URL,
    prepare_mvtec,
)
from sroc.datasets.synthetic import (
    SYNTHETIC_DEFECTS,
    SYNTHETIC_TEXTURES,
    make_synthetic_dataset,
)

__all__ = [
    "MVTEC_AD_CATEGORIES",
    "MVTEC_AD_SHA256",
    "MVTEC_AD_URL",
    "SYNTHETIC_DEFECTS",
    "SYNTHETIC_TEXTURES",
    "DownloadError",
    "UnsafeArchiveError",
    "download_file",
    "elpv_defect_type",
    "extract_archive_safely",
    "file_sha256",
    "make_synthetic_dataset",
    "prepare_elpv",
    "prepare_mvtec",
    "verify_sha256",
]
