"""Dataset sources, each delivered in the MVTec AD folder layout that ``sroc.data`` reads.

- MVTec AD: :func:`download_file` (streaming, resumable, sha256-verified), then
  :func:`extract_archive_safely` or :func:`prepare_mvtec`.
- elpv (PyPI package ``elpv-dataset``): :func:`prepare_elpv`.
- A seeded synthetic texture dataset with defects and masks: :func:`make_synthetic_dataset`.

Every function that creates a folder builds it in a hidden temporary folder beside the target and
renames it into place at the end, so an interrupted job never leaves a half-built dataset that a
later run would take for finished.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from importlib import metadata, resources
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from sroc.data import GOOD, MASK_STEM_SUFFIX, DatasetError, list_categories

logger = logging.getLogger(__name__)

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

_CHUNK_BYTES = 1 << 20
_MAX_PROBLEMS_SHOWN = 20


class DownloadError(DatasetError):
    """A download failed, was interrupted, or its sha256 differs from the pinned one."""


class UnsafeArchiveError(DatasetError):
    """An archive holds a member that would be written outside its target, or a special file."""


# --------------------------------------------------------------------------------------------
# Download and checksums


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


# --------------------------------------------------------------------------------------------
# Safe archive extraction


@dataclass(frozen=True)
class _Member:
    name: str  # as stored in the archive
    parts: tuple[str, ...]  # normalised path components; () for the archive root itself
    kind: str  # "file", "dir", "symlink", "hardlink" or "special"
    link: str = ""  # target of a symlink or hardlink
    size: int = 0


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def _split_member_name(name: str) -> tuple[str, ...]:
    # Backslashes count as separators too: a Windows-made archive may use them, and an "..\\"
    # component must not slip through as an ordinary file name.
    return tuple(part for part in re.split(r"[\\/]", name) if part not in ("", "."))


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(name) is not None


def _tar_members(archive: tarfile.TarFile) -> Iterator[_Member]:
    for info in archive.getmembers():
        if info.isfile():
            kind = "file"
        elif info.isdir():
            kind = "dir"
        elif info.issym():
            kind = "symlink"
        elif info.islnk():
            kind = "hardlink"
        else:
            kind = "special"
        yield _Member(info.name, _split_member_name(info.name), kind, info.linkname, info.size)


def _zip_members(archive: zipfile.ZipFile) -> Iterator[_Member]:
    for info in archive.infolist():
        unix_mode = info.external_attr >> 16
        if stat.S_ISLNK(unix_mode):
            kind = "symlink"
        elif info.is_dir():
            kind = "dir"
        elif stat.S_IFMT(unix_mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            # Many zip writers store permission bits without a file type: those are files.
            kind = "special"
        else:
            kind = "file"
        link = archive.read(info).decode("utf-8", "replace") if kind == "symlink" else ""
        yield _Member(info.filename, _split_member_name(info.filename), kind, link, info.file_size)


def _link_problem(member: _Member, symlinks: set[tuple[str, ...]]) -> str | None:
    """Why ``member``'s link target is unsafe, or None. Resolution is lexical, and refuses to go
    through another symlink, whose own target could change where ".." leads."""
    if _is_absolute(member.link):
        return f"{member.kind} to the absolute path {member.link!r}"
    # A symlink's target is relative to its folder; a tar hardlink's to the archive root.
    position = list(member.parts[:-1]) if member.kind == "symlink" else []
    for component in re.split(r"[\\/]", member.link):
        if component in ("", "."):
            continue
        if tuple(position) in symlinks and position:
            return f"{member.kind} target {member.link!r} goes through another symlink"
        if component == "..":
            if not position:
                return f"{member.kind} to {member.link!r}, outside the target folder"
            position.pop()
        else:
            position.append(component)
    return None


def _member_problems(members: Sequence[_Member], archive_format: str) -> list[str]:
    problems: list[str] = []
    symlinks = {m.parts for m in members if m.kind == "symlink"}
    files = {m.parts for m in members if m.kind == "file"}
    seen: dict[tuple[str, ...], str] = {}
    for member in members:
        reason = None
        if _is_absolute(member.name):
            reason = "absolute path"
        elif ".." in re.split(r"[\\/]", member.name):
            reason = "parent-folder (..) component"
        elif member.kind == "special":
            reason = "special file (device, FIFO or socket)"
        elif not member.parts and member.kind != "dir":
            reason = "empty name"
        elif any(member.parts[:i] in symlinks for i in range(1, len(member.parts))):
            reason = "written through a symlink of the archive"
        elif member.kind == "symlink" and archive_format == "zip":
            reason = "symlink in a zip archive (zip symlinks are not supported; re-pack without)"
        elif member.kind in ("symlink", "hardlink"):
            reason = _link_problem(member, symlinks)
            if (
                reason is None
                and member.kind == "hardlink"
                and _split_member_name(member.link) not in files
            ):
                reason = f"hardlink to {member.link!r}, which is not a file of the archive"
        if (
            reason is None
            and member.parts in seen
            and not (member.kind == "dir" and seen[member.parts] == "dir")
        ):
            reason = "appears twice in the archive"
        seen.setdefault(member.parts, member.kind)
        if reason is not None:
            problems.append(f"{member.name!r}: {reason}")
    return problems


@contextmanager
def _open_archive(archive: Path) -> Iterator[tuple[str, list[_Member], object]]:
    """Yield (format, members, handle) for a tar (plain, gz, bz2, xz) or zip archive."""
    if not archive.is_file():
        raise DatasetError(f"{archive}: archive not found. Fix: check the path in the config.")
    handle = None
    try:
        # A plain tar whose last member is a zip file can look like a zip: trust ".zip" first.
        if archive.name.lower().endswith(".zip") or (
            not tarfile.is_tarfile(archive) and zipfile.is_zipfile(archive)
        ):
            archive_format, handle = "zip", zipfile.ZipFile(archive)
            members = list(_zip_members(handle))
        elif tarfile.is_tarfile(archive):
            archive_format, handle = "tar", tarfile.open(archive, "r:*")
            members = list(_tar_members(handle))
        else:
            raise DatasetError(
                f"{archive}: not a tar, tar.gz, tar.bz2, tar.xz or zip archive. Fix: name a "
                "supported archive, or extract it yourself and name the folder in the config."
            )
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        EOFError,
        zlib.error,
        lzma.LZMAError,
        OSError,
    ) as error:
        if handle is not None:
            handle.close()
        raise DatasetError(
            f"{archive}: corrupt or truncated archive ({type(error).__name__}: {error}). Fix: "
            "delete it and download it again."
        ) from error
    with handle:
        yield archive_format, members, handle


def _refuse_existing(target: Path) -> None:
    if target.is_symlink() or (
        target.exists() and not (target.is_dir() and not any(target.iterdir()))
    ):
        raise DatasetError(
            f"{target}: already exists. Fix: delete it to build it again, or name it as an "
            "existing dataset in the config."
        )


def _publish_directory(built: Path, target: Path) -> None:
    """Rename the finished folder ``built`` onto ``target`` (absent or an empty folder)."""
    _refuse_existing(target)
    if target.is_dir():
        target.rmdir()
    os.rename(built, target)


@contextmanager
def _building_directory(target: Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``target``; removed on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".building", dir=target.parent)
    )
    try:
        yield building
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _extract(
    archive: Path,
    target: Path,
    select_root: Sequence[str] | None = None,
    subfolders: Sequence[str] | None = None,
) -> Path:
    """Validate every member, then extract (a part of) the archive into ``target``.

    ``select_root``: components of the folder inside the archive that becomes ``target``.
    ``subfolders``: only these folders of that root, plus its loose files, are extracted.
    """
    target = Path(target)
    _refuse_existing(target)
    with _open_archive(Path(archive)) as (archive_format, members, handle):
        problems = _member_problems(members, archive_format)
        if problems:
            shown = "\n".join(f"  - {p}" for p in problems[:_MAX_PROBLEMS_SHOWN])
            more = len(problems) - _MAX_PROBLEMS_SHOWN
            raise UnsafeArchiveError(
                f"{archive}: refused, {len(problems)} unsafe member(s); nothing was extracted:\n"
                f"{shown}" + (f"\n  ... and {more} more" if more > 0 else "") + "\nFix: use the "
                "official archive (check its sha256); never extract this one by hand."
            )
        root = tuple(select_root or ())
        wanted = {
            m.name
            for m in members
            if m.parts[: len(root)] == root
            and (
                subfolders is None
                or (len(m.parts) > len(root) and m.parts[len(root)] in subfolders)
                or (len(m.parts) == len(root) + 1 and m.kind == "file")
            )
        }
        _require_free_space(target, sum(m.size for m in members if m.name in wanted))
        with _building_directory(target) as building:
            if archive_format == "zip":
                handle.extractall(building, members=sorted(wanted))
            else:
                # Members are validated above; the "data" filter is a second line of defence and
                # drops permission bits such as setuid.
                handle.extractall(
                    building,
                    members=[i for i in handle.getmembers() if i.name in wanted],
                    filter="data",
                )
            _publish_directory(building.joinpath(*root), target)
    return target


def _require_free_space(target: Path, needed: int) -> None:
    existing = next(p for p in (target.parent, *target.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise DatasetError(
            f"{target}: extraction needs {needed / 1e9:.2f} GB but {free / 1e9:.2f} GB are free "
            "there. Fix: free disk space or extract to another disk."
        )


def extract_archive_safely(archive: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Extract a tar, tar.gz, tar.bz2, tar.xz or zip archive into ``target`` and return it.

    Every member is validated before anything is written: absolute paths, ".." components,
    links pointing outside the target (or through another link), writes through a link, special
    files and duplicate names are refused with :class:`UnsafeArchiveError` listing them. The
    archive is extracted into a hidden folder beside ``target`` that is renamed into place, so a
    failure leaves no partial ``target``. ``target`` must not exist (or be an empty folder).
    """
    return _extract(Path(archive), Path(target))


def _locate_categories(
    members: Sequence[_Member], categories: Sequence[str], archive: Path
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
        _refuse_existing(target)
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
    with _open_archive(archive) as (_, members, _handle):
        root = _locate_categories(members, categories, archive)
    return _extract(archive, target, select_root=root, subfolders=categories)


# --------------------------------------------------------------------------------------------
# elpv


def _parse_probability(value, setting: str) -> Fraction:
    try:
        probability = Fraction(str(value).strip())
    except (ValueError, ZeroDivisionError) as error:
        raise DatasetError(
            f"elpv {setting}: {value!r} is not a probability. Fix: write 0, 1/3, 2/3, 1 or "
            "their decimal values."
        ) from error
    return probability


def _match_levels(values, levels: Sequence[float], setting: str) -> set[float]:
    """Map configured probabilities (floats or "2/3") onto the dataset's exact levels."""
    matched = set()
    for value in values:
        probability = _parse_probability(value, setting)
        nearest = min(levels, key=lambda level: abs(level - probability))
        if abs(nearest - probability) > 0.02:
            shown = ", ".join(f"{level:.4g}" for level in levels)
            raise DatasetError(
                f"elpv {setting}: {value!r} matches none of the dataset's defect probabilities "
                f"({shown}). Fix: use these values (e.g. 0, 1/3, 2/3, 1)."
            )
        matched.add(nearest)
    return matched


def elpv_defect_type(probability: float) -> str:
    """Folder name of a defective elpv level: "defect_p100" for 1, "defect_p067" for 2/3."""
    return f"defect_p{round(probability * 100):03d}"


def _default_elpv_source() -> Path:
    try:
        return Path(str(resources.files("elpv_dataset") / "data"))
    except ModuleNotFoundError as error:
        raise DatasetError(
            "elpv: the PyPI package elpv-dataset is not installed. Fix: pip install elpv-dataset."
        ) from error


def _read_elpv_labels(source: Path) -> list[tuple[Path, float, str]]:
    labels = source / "labels.csv"
    if not labels.is_file():
        raise DatasetError(
            f"{labels}: elpv label file not found. Fix: name the elpv 'data' folder (holding "
            "labels.csv and images/) or reinstall elpv-dataset."
        )
    rows = []
    for number, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            relative, probability, module_type = fields
            rows.append((source / relative, float(probability), module_type))
        except ValueError as error:
            raise DatasetError(
                f"{labels}:{number}: expected '<image path> <probability> <mono|poly>', got "
                f"{line!r}. Fix: restore the file from the elpv-dataset package."
            ) from error
    return rows


def prepare_elpv(
    target: str | os.PathLike,
    good_probabilities: Sequence[float | str] = (0.0,),
    defective_probabilities: Sequence[float | str] = ("2/3", 1.0),
    test_good_every: int = 3,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write the elpv solar cells in MVTec AD layout at ``target`` and return it.

    Categories are the module types (``mono``, ``poly``). Cells whose defect probability is in
    ``good_probabilities`` are good; those in ``defective_probabilities`` are defective, in
    ``test/defect_p<100*p>`` (e.g. ``defect_p067``) so that pollution can be stratified by
    annotator confidence; every other level is excluded. Probabilities may be written as floats
    or fractions ("2/3"). elpv has no split: of the good cells sorted by file name, every
    ``test_good_every``-th (the k-th, 2k-th, ...) goes to ``test/good``, the rest to
    ``train/good``. There are no masks (index with ``require_masks=False``). The PNG files are
    copied unchanged from ``source`` (default: the installed package's ``data`` folder); a
    ``dataset_info.json`` records the mapping and the counts.
    """
    target = Path(target)
    source = Path(source) if source is not None else _default_elpv_source()
    if (
        isinstance(test_good_every, bool)
        or not isinstance(test_good_every, int)
        or test_good_every < 2
    ):
        raise DatasetError(
            f"elpv test_good_every: {test_good_every!r}; it must be an integer >= 2 (every k-th "
            "good cell goes to test/good, k=1 would leave no training image). Fix: use e.g. 3."
        )
    rows = _read_elpv_labels(source)
    levels = sorted({probability for _, probability, _ in rows})
    good = _match_levels(good_probabilities, levels, "good_probabilities")
    defective = _match_levels(defective_probabilities, levels, "defective_probabilities")
    if not good or not defective:
        raise DatasetError(
            "elpv: good_probabilities and defective_probabilities must both name at least one "
            "level. Fix: e.g. good [0], defective [2/3, 1]."
        )
    if good & defective:
        raise DatasetError(
            f"elpv: probabilities {sorted(good & defective)} are both good and defective. Fix: "
            "list each level in one of the two settings only."
        )
    _refuse_existing(target)
    counts: dict[str, dict[str, int]] = {}
    with _building_directory(target) as building:
        for module_type in sorted({t for _, _, t in rows}):
            cells = sorted((r for r in rows if r[2] == module_type), key=lambda r: r[0].name)
            goods = [path for path, p, _ in cells if p in good]
            placed = [
                ("train/good" if (i + 1) % test_good_every else "test/good", path)
                for i, path in enumerate(goods)
            ]
            placed += [
                (f"test/{elpv_defect_type(p)}", path) for path, p, _ in cells if p in defective
            ]
            for folder, path in placed:
                destination = building / module_type / folder / path.name
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, destination)
            category_counts = {
                folder: sum(1 for f, _ in placed if f == folder)
                for folder in sorted({f for f, _ in placed})
            }
            category_counts["excluded"] = len(cells) - len(placed)
            counts[module_type] = category_counts
        info = {
            "source": str(source),
            "elpv_dataset_version": _package_version("elpv-dataset"),
            "good_probabilities": sorted(good),
            "defective_probabilities": sorted(defective),
            "excluded_probabilities": [p for p in levels if p not in good | defective],
            "test_good_every": test_good_every,
            "counts": counts,
        }
        (building / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
        _publish_directory(building, target)
    logger.info("elpv written to %s: %s", target, counts)
    return target


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# Seeded synthetic textures with defects


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled Gaussian noise on a (cells+1)^2 grid: smooth, about unit scale."""
    grid = rng.standard_normal((cells + 1, cells + 1))
    t = np.linspace(0.0, cells, size)
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    along_x = grid[:, i] * (1 - f) + grid[:, i + 1] * f
    return along_x[i, :] * (1 - f)[:, None] + along_x[i + 1, :] * f[:, None]


def _rotated_coordinates(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, rotated by a small random angle and shifted by a random phase."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    angle = np.deg2rad(rng.uniform(-4.0, 4.0))
    shift = rng.uniform(0.0, size, 2)
    u = np.cos(angle) * x + np.sin(angle) * y + shift[0]
    v = -np.sin(angle) * x + np.cos(angle) * y + shift[1]
    return u, v


def _blend(base: np.ndarray, colour, alpha: np.ndarray) -> np.ndarray:
    return base * (1 - alpha[:, :, None]) + np.asarray(colour, float) * alpha[:, :, None]


def _grid_texture(rng, size, palette) -> np.ndarray:
    """Lines of a square grid, period ~size/8, with a wobble along each line."""
    scale = size / 128
    u, v = _rotated_coordinates(rng, size)
    period = size / 8 * rng.uniform(0.93, 1.07)
    u = u + 1.2 * scale * _smooth_noise(rng, size, 4)
    v = v + 1.2 * scale * _smooth_noise(rng, size, 4)
    half_width = max(0.6, 1.3 * scale)
    distance = np.minimum(np.abs(u % period - period / 2), np.abs(v % period - period / 2))
    lines = np.clip(half_width + 0.5 - distance, 0, 1)
    return _blend(np.broadcast_to(palette[0], (size, size, 3)), palette[1], lines)


def _dot_texture(rng, size, palette) -> np.ndarray:
    """Round dots on a hexagonal lattice, period ~size/9, radii jittered by smooth noise."""
    u, v = _rotated_coordinates(rng, size)
    period = size / 9 * rng.uniform(0.93, 1.07)
    row_height = period * np.sqrt(3) / 2
    nearest_row = np.round(v / row_height)
    distance = np.full((size, size), np.inf)
    for row_offset in (-1, 0, 1):
        row = nearest_row + row_offset
        stagger = (row % 2) * period / 2
        centre_u = np.round((u - stagger) / period) * period + stagger
        distance = np.minimum(distance, np.hypot(u - centre_u, v - row * row_height))
    radius = period * (0.3 + 0.03 * _smooth_noise(rng, size, 5))
    dots = np.clip(radius + 0.5 - distance, 0, 1)
    return _blend(np.broadcast_to(palette[0], (size, size, 3)), palette[1], dots)


def _stripe_texture(rng, size, palette) -> np.ndarray:
    """Wood-like bands, period ~size/6, warped by smooth noise."""
    u, _ = _rotated_coordinates(rng, size)
    period = size / 6 * rng.uniform(0.93, 1.07)
    warped = u + 0.25 * period * _smooth_noise(rng, size, 3)
    bands = 0.5 + 0.5 * np.sin(2 * np.pi * warped / period)
    return _blend(np.broadcast_to(palette[0], (size, size, 3)), palette[1], bands)


SYNTHETIC_TEXTURES = {
    "grid_texture": _grid_texture,
    "dot_texture": _dot_texture,
    "stripe_texture": _stripe_texture,
}


def _polyline_distance(points: np.ndarray, size: int) -> np.ndarray:
    """Distance of every pixel centre to a polyline given by (n, 2) points (x, y)."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    pixels = np.stack([x, y], axis=-1)[:, :, None, :]
    start, end = points[:-1], points[1:]
    segment = end - start
    t = np.clip(((pixels - start) * segment).sum(-1) / (segment**2).sum(-1), 0, 1)
    closest = start + t[..., None] * segment
    return np.sqrt(((pixels - closest) ** 2).sum(-1)).min(axis=-1)


def _contrast_colour(texture: np.ndarray, dark, bright):
    return dark if texture.mean() > 110 else bright


def _scratch(rng, texture):
    """A thin, slightly curved line across about a third of the image."""
    size = texture.shape[0]
    scale = size / 128
    length = rng.uniform(0.3, 0.45) * size
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    normal = np.array([-direction[1], direction[0]])
    centre = rng.uniform(0.3, 0.7, 2) * size
    s = np.linspace(-0.5, 0.5, 17)[:, None]
    bend = rng.uniform(-0.08, 0.08) * length * (1 - 4 * s**2)
    points = centre + s * length * direction + bend * normal
    half_width = max(0.8, rng.uniform(1.0, 1.6) * scale)
    alpha = np.clip(half_width + 0.5 - _polyline_distance(points, size), 0, 1)
    return alpha, _contrast_colour(texture, (20, 20, 24), (245, 245, 240))


def _blob_alpha(rng, size, radius, edge):
    """A filled blob with a wavy outline; ``edge`` is the width of its soft border in pixels."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    margin = radius * 1.4 + 1
    cx, cy = rng.uniform(margin, size - margin, 2)
    theta = np.arctan2(y - cy, x - cx)
    phases = rng.uniform(0, 2 * np.pi, 2)
    outline = radius * (
        1 + 0.18 * np.sin(3 * theta + phases[0]) + 0.1 * np.sin(5 * theta + phases[1])
    )
    return np.clip((outline - np.hypot(x - cx, y - cy)) / edge + 0.5, 0, 1)


def _spot(rng, texture):
    """An opaque, roughly round blob of 10-18 px diameter at 128 px."""
    size = texture.shape[0]
    alpha = _blob_alpha(rng, size, max(2.0, rng.uniform(5, 9) * size / 128), 1.0)
    return alpha, _contrast_colour(texture, (70, 40, 20), (235, 215, 140))


_STAIN_COLOURS = ((210, 40, 30), (30, 70, 210), (40, 170, 60))


def _stain(rng, texture):
    """A large translucent colour stain: the texture shows through, shifted in hue."""
    size = texture.shape[0]
    alpha = _blob_alpha(rng, size, max(3.0, rng.uniform(10, 15) * size / 128), 1.5)
    # One of the two stain colours farthest from the texture's mean colour, so it always shows.
    mean = texture.reshape(-1, 3).mean(axis=0)
    candidates = sorted(_STAIN_COLOURS, key=lambda c: -np.linalg.norm(np.subtract(c, mean)))
    return 0.6 * alpha, candidates[rng.integers(2)]


SYNTHETIC_DEFECTS = {"scratch": _scratch, "spot": _spot, "stain": _stain}


def _stable_id(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def _palette(seed: int, category: str) -> tuple[np.ndarray, np.ndarray]:
    """Background and pattern colours of a category: dark-on-light or light-on-dark."""
    rng = np.random.default_rng([seed, _stable_id(category)])
    light = rng.uniform(150, 210, 3)
    dark = rng.uniform(40, 100, 3)
    return (light, dark) if rng.random() < 0.5 else (dark, light)


def _texture_of(category: str):
    if category in SYNTHETIC_TEXTURES:
        return SYNTHETIC_TEXTURES[category]
    textures = list(SYNTHETIC_TEXTURES.values())
    return textures[_stable_id(category) % len(textures)]


def _synthetic_image(seed, category, role, index, size, palette, defect_type=None):
    rng = np.random.default_rng([seed, _stable_id(category), _stable_id(role), index])
    image = _texture_of(category)(rng, size, palette)
    # Per-image illumination and sensor noise, so that no two good images are identical.
    image = image * (1 + 0.05 * _smooth_noise(rng, size, 2))[:, :, None]
    mask = None
    if defect_type is not None:
        alpha, colour = SYNTHETIC_DEFECTS[defect_type](rng, image)
        image = _blend(image, colour, alpha)
        mask = alpha >= 0.5 * alpha.max()
    image = image + rng.normal(0.0, 3.0, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), mask


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DatasetError(f"synthetic {name}: {value!r}; it must be an integer >= {minimum}.")


def make_synthetic_dataset(
    root: str | os.PathLike,
    categories: Sequence[str] = ("grid_texture", "dot_texture"),
    seed: int = 0,
    image_size: int = 128,
    n_train: int = 30,
    n_test_good: int = 10,
    n_test_per_defect: int = 8,
    defect_types: Sequence[str] = ("scratch", "spot", "stain"),
) -> Path:
    """Write a seeded synthetic dataset in MVTec AD layout at ``root`` and return it.

    Each category is a regular texture with random phase, small rotation, line wobble,
    illumination and noise: ``grid_texture``, ``dot_texture`` and ``stripe_texture`` by name; any
    other name gets one of them chosen by a stable hash of the name. Defect types: ``scratch``
    (thin curved line), ``spot`` (opaque blob) and ``stain`` (translucent colour blob), one per
    defective image, with its 0/255 mask. The same arguments give byte-identical files.
    """
    root = Path(root)
    categories = list(categories)
    defect_types = list(defect_types)
    if (
        not categories
        or len(set(categories)) != len(categories)
        or any(not c or c.startswith(".") or re.search(r"[\\/]", c) for c in categories)
    ):
        raise DatasetError(
            f"synthetic categories {categories!r}: give distinct, non-empty folder names "
            "(no slash, not starting with a dot)."
        )
    unknown = [d for d in defect_types if d not in SYNTHETIC_DEFECTS]
    if unknown or len(set(defect_types)) != len(defect_types):
        raise DatasetError(
            f"synthetic defect_types {defect_types!r}: use distinct names among "
            f"{', '.join(SYNTHETIC_DEFECTS)}."
        )
    _check_count("seed", seed, 0)
    _check_count("image_size", image_size, 16)
    _check_count("n_train", n_train, 1)
    _check_count("n_test_good", n_test_good, 0)
    _check_count("n_test_per_defect", n_test_per_defect, 1 if defect_types else 0)
    _refuse_existing(root)
    with _building_directory(root) as building:
        for category in categories:
            palette = _palette(seed, category)
            plan = [("train", GOOD, n_train), ("test", GOOD, n_test_good)]
            plan += [("test", d, n_test_per_defect) for d in defect_types]
            for origin, folder, count in plan:
                for index in range(count):
                    defect = None if folder == GOOD else folder
                    image, mask = _synthetic_image(
                        seed, category, f"{origin}/{folder}", index, image_size, palette, defect
                    )
                    name = f"{index:03d}"
                    _save_png(image, building / category / origin / folder / f"{name}.png")
                    if mask is not None:
                        _save_png(
                            mask.astype(np.uint8) * 255,
                            building
                            / category
                            / "ground_truth"
                            / folder
                            / f"{name}{MASK_STEM_SUFFIX}.png",
                        )
        _publish_directory(building, root)
    return root


def _save_png(pixels: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
