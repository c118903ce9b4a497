"""Plugin files: Python files that register strategies or detectors without editing the library.

A plugin file calls :func:`sroc.strategies.register` or defines a ``BaseDetector`` subclass with
a ``name=``; the config's ``plugins:`` list names such files (relative to the working directory,
or absolute), and every process of the workflow (the Snakefile, each grid and report job) imports
them before it reads the registries. Each file is imported once per process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

_LOADED: dict[Path, ModuleType] = {}


def load_plugins(paths: Iterable[str | Path]) -> list[ModuleType]:
    """Import every plugin file of ``paths`` (once per process) and return the modules."""
    modules = []
    for path in paths:
        resolved = Path(path).expanduser().resolve()
        if resolved not in _LOADED:
            _LOADED[resolved] = _import(path, resolved)
        modules.append(_LOADED[resolved])
    return modules


def _import(path: str | Path, resolved: Path) -> ModuleType:
    if not resolved.is_file() or resolved.suffix != ".py":
        raise FileNotFoundError(
            f"config plugins: {path!s} ({resolved}) is not a Python file: name .py files that "
            "register strategies or detectors, relative to the working directory or absolute"
        )
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    name = f"sroc_plugin_{resolved.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module
