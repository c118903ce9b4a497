"""The ``sroc`` command. ``sroc clean IMAGES_DIR --out OUT_DIR`` flags the images of an
unlabelled folder that look defective (see docs/clean.md)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from sroc.clean import (
    DEFAULT_DETECTOR,
    CleanError,
    copy_images,
    list_images,
    run_clean,
    write_outputs,
)
from sroc.datasets.layout import DatasetError
from sroc.detectors import DETECTORS

logger = logging.getLogger("sroc")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sroc", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    clean = commands.add_parser(
        "clean",
        help="flag the likely defective images of an unlabelled folder",
        description="Embed every image under IMAGES_DIR, score each against the others and "
        "write scores.csv, clean.txt, suspects.txt and report.html into OUT_DIR. Input files "
        "are never modified, moved or deleted.",
    )
    clean.add_argument(
        "images_dir",
        metavar="IMAGES_DIR",
        type=Path,
        help="folder of png/jpg/bmp/tif images, read recursively (never modified)",
    )
    clean.add_argument(
        "--out", required=True, type=Path, metavar="OUT_DIR", help="folder for the outputs"
    )
    clean.add_argument(
        "--ratio",
        default="auto",
        help="fraction of images to flag, or 'auto' to estimate it from the scores (default)",
    )
    clean.add_argument(
        "--detector",
        default=DEFAULT_DETECTOR,
        help=f"{', '.join(sorted(DETECTORS))}: the detector whose self-scores rank the images "
        f"(default {DEFAULT_DETECTOR})",
    )
    clean.add_argument(
        "--backbone", help="timm backbone name (default: the project's, tf_efficientnet_lite2)"
    )
    clean.add_argument(
        "--input-size", type=int, metavar="PX", help="backbone input size (default: 380)"
    )
    clean.add_argument(
        "--cache-dir",
        type=Path,
        help="where the embedding cache is kept (default OUT_DIR/cache); a second run on the "
        "same files reuses it",
    )
    clean.add_argument(
        "--copy-clean",
        type=Path,
        metavar="DIR",
        help="copy the kept images into this new folder (refused if it exists)",
    )
    clean.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images instead of stopping"
    )
    clean.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    clean.add_argument("--threads", type=int, default=1, help="embedding and scoring threads")
    clean.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def clean_command(args: argparse.Namespace) -> None:
    images_dir = args.images_dir
    for option, path in (
        ("--out", args.out),
        ("--cache-dir", args.cache_dir),
        ("--copy-clean", args.copy_clean),
    ):
        if path is not None and _inside(path, images_dir):
            raise CleanError(
                f"{option} {path} is inside IMAGES_DIR {images_dir}; the input folder is never "
                "written to. Fix: choose a folder outside it"
            )
    if args.copy_clean is not None and args.copy_clean.exists():
        raise CleanError(
            f"--copy-clean {args.copy_clean} already exists; it is never overwritten. Fix: give "
            "a new folder"
        )
    from sroc.backbones import BackboneConfig

    backbone = BackboneConfig()
    if args.backbone is not None:
        backbone = BackboneConfig(name=args.backbone, input_size=backbone.input_size)
    if args.input_size is not None:
        backbone = dataclasses.replace(backbone, input_size=args.input_size)
    run = run_clean(
        list_images(images_dir),
        ratio=args.ratio,
        detector=args.detector,
        backbone=backbone,
        cache_dir=args.cache_dir if args.cache_dir is not None else args.out / "cache",
        threads=args.threads,
        device=args.device,
        skip_bad=args.skip_bad,
        progress=not args.quiet,
    )
    outputs = write_outputs(run, args.out)
    frame = run.frame
    print(
        f"{int(frame['suspect'].sum())} suspect(s) among {len(frame)} images "
        f"(ratio {run.settings['ratio']}); report: {outputs['report.html']}"
    )
    if args.copy_clean is not None:
        kept = frame.loc[~frame["suspect"], "path"]
        copy_images(kept, images_dir, args.copy_clean)
        print(f"{len(kept)} kept image(s) copied into {args.copy_clean}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        clean_command(args)
    except (CleanError, DatasetError, ValueError) as error:
        print(f"sroc {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
