"""Streaming, resumable, sha256-verified downloads."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from sroc.datasets.layout import DatasetError

logger = logging.getLogger(__name__)


_CHUNK_BYTES = 1 << 20


class DownloadError(DatasetError):
    """A download failed, was interrupted, or its sha256 differs from the pinned one."""


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: str | os.PathLike, sha256: str | None) -> str:
    """Check ``path`` against the expected hex ``sha256`` and return the actual hash.

    ``sha256=None`` checks nothing and logs the computed hash with a warning, so the user can pin
    it in the config.
    """
    actual = file_sha256(path)
    if sha256 is None:
        logger.warning(
            "%s: no sha256 pinned; its sha256 is %s. Pin it in the config (sha256: %s) so that "
            "a corrupted or substituted file is refused.",
            path,
            actual,
            actual,
        )
    elif actual != _normalise_sha256(sha256):
        raise DownloadError(
            f"{path}: sha256 mismatch: expected {_normalise_sha256(sha256)}, actual {actual}. "
            "Fix: if the file is incomplete or corrupted, delete it and download it again; if you "
            "trust this file (e.g. a re-packed copy), set the configured sha256 to the actual "
            "value."
        )
    return actual


def _normalise_sha256(sha256: str) -> str:
    value = str(sha256).strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise DownloadError(
            f"sha256 {sha256!r} is not 64 hexadecimal digits. Fix: copy the full sha256 hex "
            "digest into the config, or set it to null to have it computed and logged."
        )
    return value


def download_file(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` with urllib, verify its sha256, and return ``dest``.

    Bytes stream into ``.<name>.part`` beside ``dest``; an interrupted download resumes from it
    with an HTTP Range request on the next call (servers that ignore Range restart from zero).
    ``dest`` appears only once complete and verified. On a sha256 mismatch the file is kept as
    ``<dest>.sha256-mismatch`` for inspection and :class:`DownloadError` names both hashes.
    ``sha256=None`` accepts the file and logs its hash with a warning (pin it in the config).
    An existing ``dest`` is verified and reused without any request.
    """
    dest = Path(dest)
    expected = None if sha256 is None else _normalise_sha256(sha256)
    if dest.exists():
        verify_sha256(dest, expected)
        logger.info("%s exists; not downloaded again", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The partial file needs a name that is stable across runs so that a later run can resume it,
    # which sroc.io.atomic_path's random temporary name cannot give; the final os.replace gives
    # the same all-or-nothing guarantee.
    part = dest.with_name(f".{dest.name}.part")
    _fetch_into(url, part, progress=progress, timeout=timeout)
    actual = file_sha256(part)
    if expected is not None and actual != expected:
        rejected = dest.with_name(f"{dest.name}.sha256-mismatch")
        os.replace(part, rejected)
        raise DownloadError(
            f"{url}: sha256 mismatch for {dest}: expected {expected}, actual {actual}. The "
            f"downloaded file is kept as {rejected}. Fix: if the server legitimately changed the "
            "file, update the configured sha256 to the actual value and move the file to "
            f"{dest}; otherwise delete it and download again."
        )
    if expected is None:
        verify_sha256(part, None)
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, progress: bool, timeout: float) -> None:
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "sroc-dataset-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        )
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # The requested range starts at or after the end: the partial file is complete.
            return
        raise DownloadError(
            f"{url}: HTTP {error.code} {error.reason}. Fix: check the URL in the config; if the "
            "host moved the file, download it by hand and name the local copy in the config."
        ) from error
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(
            f"{url}: cannot connect ({error}). Fix: check the network and the URL, or download "
            "the file by hand and name the local copy in the config."
        ) from error
    with response:
        status = response.status
        resumed = offset > 0 and status == 206 and _range_starts_at(response, offset)
        if offset and not resumed:
            logger.warning(
                "%s: the server did not resume at byte %d; downloading from the start", url, offset
            )
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = offset
        with (
            open(part, "ab" if resumed else "wb") as handle,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=part.name[1:-5],
                disable=not progress,
            ) as bar,
        ):
            try:
                while chunk := response.read(_CHUNK_BYTES):
                    handle.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, ValueError, http.client.HTTPException) as error:
                raise _interrupted(url, part, received, total, error) from error
    if total is not None and received < total:
        raise _interrupted(url, part, received, total, "connection closed early")


def _range_starts_at(response, offset: int) -> bool:
    content_range = response.headers.get("Content-Range", "")
    return re.match(rf"bytes {offset}-\d+/(\d+|\*)$", content_range.strip()) is not None


def _interrupted(url, part, received, total, reason) -> DownloadError:
    of_total = f" of {total}" if total is not None else ""
    return DownloadError(
        f"{url}: download interrupted after {received}{of_total} bytes ({reason}). Fix: run again "
        f"to resume from {part}, or delete that file to start over."
    )
