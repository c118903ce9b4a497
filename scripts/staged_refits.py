"""Refits that a ``rank`` job computed for the ``refine`` jobs of its cell (docs/refinement.md,
"The grid and its jobs"), and how a ``refine`` job adopts them.

The standard library only: a ``refine`` job that adopts its staged outputs starts no more than a
Python and Snakemake's script preamble (no sroc, numpy or pandas import, no feature load).

A staged ratio is three files in the cell's staging folder: the scores and the metrics that the
``refine`` job at that ratio would write, and a key, written last. The key holds that job's params
and the SHA-256 of its manifest, split sidecar and ``ranked.h5``; a ``refine`` job adopts the
files only when the key equals its own, and otherwise computes them itself, so a stale or partial
staging folder never changes a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

# What a refine job's params hold that its outputs depend on (workflow/rules/refine.smk).
KEY_PARAMS = ("setup", "strategies", "ratio", "plugins", "evaluation", "input_size")
# The refine job's inputs whose contents its outputs depend on, besides the feature cache (named
# by its path, which holds the backbone's hash; it is ranked.h5's input too).
KEY_INPUTS = ("manifest", "info", "ranked")


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def job_key(params: dict, inputs: dict) -> str:
    """The key of a refine job: its params (``KEY_PARAMS``) and inputs (``KEY_INPUTS`` by content,
    the cache by path), as canonical JSON."""
    key = {
        "params": {name: params[name] for name in KEY_PARAMS},
        "inputs": {name: _sha256(inputs[name]) for name in KEY_INPUTS},
        "cache": str(inputs["cache"]),
    }
    return json.dumps(key, sort_keys=True, default=str)


def paths(folder, ratio: str) -> dict[str, Path]:
    """The staged files of ratio ``ratio`` (as the refine job's wildcard writes it)."""
    folder = Path(folder)
    return {
        "scores": folder / f"refined-r{ratio}.h5",
        "metrics": folder / f"refined-r{ratio}.csv",
        "key": folder / f"refined-r{ratio}.key.json",
    }


def clear(folder) -> None:
    """Remove what an earlier rank job of the cell staged."""
    shutil.rmtree(folder, ignore_errors=True)


def seal(folder, ratio: str, key: str) -> None:
    """Write the key of ratio ``ratio``'s staged files, once they are complete."""
    target = paths(folder, ratio)["key"]
    partial = target.with_name(target.name + ".partial")
    partial.write_text(key)
    os.replace(partial, target)


def adopt(folder, ratio: str, key: str, outputs: dict) -> bool:
    """Move ratio ``ratio``'s staged files to the refine job's ``outputs`` (``scores``,
    ``metrics``) if their key is ``key``; whether it did. Adopted outputs get the current time
    as their modification time: the refine job made them. Staged files of another key, or
    without one, are removed: no job of these params and inputs could adopt them."""
    staged = paths(folder, ratio)
    try:
        found = staged["key"].read_text()
    except OSError:
        found = None
    if found != key:
        for path in staged.values():
            path.unlink(missing_ok=True)
        _remove_if_empty(folder)
        return False
    for name in ("scores", "metrics"):
        target = Path(outputs[name])
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(staged[name], target)
        os.utime(target)
    staged["key"].unlink()
    _remove_if_empty(folder)
    return True


def _remove_if_empty(folder) -> None:
    """Remove the cell's staging folder once its last refine job took its files."""
    try:
        os.rmdir(folder)
    except OSError:
        pass
