"""Logging for rule scripts: everything a job says, and its traceback, goes to the rule's log."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def rule_logging(
    log_path: str | Path | None, level: int = logging.INFO
) -> Iterator[logging.Logger]:
    """Send logging and stderr (progress bars) to ``log_path`` for the duration of a rule.

    An exception is logged with its traceback before it propagates, so the rule's log says why the
    job failed even when Snakemake only reports the exit status.
    """
    logger = logging.getLogger("sroc")
    if log_path is None:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        yield logger
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(level)
        try:
            with contextlib.redirect_stderr(stream):
                yield logger
        except BaseException:
            logger.exception("job failed")
            raise
        finally:
            root.removeHandler(handler)
