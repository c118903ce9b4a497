"""What a cleaning leaves on disk: the lists, the scores and the report
(:func:`write_outputs`), and a copy of the kept images (:func:`copy_images`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sroc.clean.html_report import report_html
from sroc.clean.pipeline import CleanError, CleanRun
from sroc.io import atomic_path, write_text_atomic


def write_outputs(run: CleanRun, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``scores.csv``, ``clean.txt``, ``suspects.txt`` and ``report.html`` into
    ``out_dir``, each atomically; returns their paths by name."""
    out_dir = Path(out_dir)
    frame = run.frame
    outputs = {name: out_dir / name for name in ("scores.csv", "clean.txt", "suspects.txt")}
    with atomic_path(outputs["scores.csv"], suffix=".csv.tmp") as temporary:
        frame[["path", "score", "rank", "suspect"]].to_csv(temporary, index=False)
    for name, selection in (("clean.txt", ~frame["suspect"]), ("suspects.txt", frame["suspect"])):
        write_text_atomic(outputs[name], "".join(f"{p}\n" for p in frame.loc[selection, "path"]))
    outputs["report.html"] = out_dir / "report.html"
    write_text_atomic(outputs["report.html"], report_html(run))
    return outputs


def copy_images(
    paths: Sequence[str | os.PathLike], root: str | os.PathLike, destination: str | os.PathLike
) -> Path:
    """Copy ``paths`` (files under ``root``) into the new folder ``destination``, keeping their
    paths relative to ``root`` and their modification times. Refuses an existing
    ``destination``; the folder appears only once every file is copied."""
    root, destination = Path(root), Path(destination)
    if destination.exists():
        raise CleanError(
            f"{destination} already exists; copying the kept images never overwrites. Fix: "
            "give a new folder"
        )
    destination.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        for path in paths:
            target = building / Path(path).relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        os.rename(building, destination)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return destination
