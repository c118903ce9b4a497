"""Clean an unlabelled set of images before training: which images should be dropped?

- :mod:`sroc.clean.pipeline`: :func:`clean` embeds the images with the frozen backbone (through
  the HDF5 embedding cache of ``sroc.embeddings``), fits a detector on all of them and scores
  every image against the others (SROC self-scoring; KNN leave-one-out by default), then flags
  the highest-scored images as suspects: as many as the contamination estimated from the scores
  (``ratio="auto"``, :mod:`sroc.contamination`) or a fixed fraction; :func:`run_clean` also
  returns what the report shows.
- :mod:`sroc.clean.outputs`: :func:`write_outputs` writes the lists, the scores and the report;
  :func:`copy_images` copies the kept images elsewhere.
- :mod:`sroc.clean.html_report`: :func:`report_html`, the self-contained HTML page.

Nothing here writes into, moves or deletes an input file. ``sroc clean`` (``sroc.cli``) is the
command-line front end; docs/clean.md documents both. ``import sroc`` binds ``sroc.clean`` to the
function :func:`clean`: import the rest with ``from sroc.clean import ...``.
"""

from sroc.clean.html_report import report_html
from sroc.clean.outputs import copy_images, write_outputs
from sroc.clean.pipeline import (
    DEFAULT_DETECTOR,
    DEFAULT_DETECTOR_PARAMS,
    IMAGE_SUFFIXES,
    MAX_RATIO,
    MIN_IMAGES,
    CleanError,
    CleanRun,
    clean,
    detector_factory,
    list_images,
    run_clean,
)

__all__ = [
    "DEFAULT_DETECTOR",
    "DEFAULT_DETECTOR_PARAMS",
    "IMAGE_SUFFIXES",
    "MAX_RATIO",
    "MIN_IMAGES",
    "CleanError",
    "CleanRun",
    "clean",
    "copy_images",
    "detector_factory",
    "list_images",
    "report_html",
    "run_clean",
    "write_outputs",
]
