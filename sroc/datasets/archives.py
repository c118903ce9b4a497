"""Safe extraction of tar and zip archives: every member is validated before anything is written."""

from __future__ import annotations

import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sroc.datasets.folders import building_directory, publish_directory, refuse_existing
from sroc.datasets.layout import DatasetError

_MAX_PROBLEMS_SHOWN = 20


class UnsafeArchiveError(DatasetError):
    """An archive holds a member that would be written outside its target, or a special file."""


@dataclass(frozen=True)
class ArchiveMember:
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


def _tar_members(archive: tarfile.TarFile) -> Iterator[ArchiveMember]:
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
        yield ArchiveMember(
            info.name, _split_member_name(info.name), kind, info.linkname, info.size
        )


def _zip_members(archive: zipfile.ZipFile) -> Iterator[ArchiveMember]:
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
        yield ArchiveMember(
            info.filename, _split_member_name(info.filename), kind, link, info.file_size
        )


def _link_problem(member: ArchiveMember, symlinks: set[tuple[str, ...]]) -> str | None:
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


def _member_problems(members: Sequence[ArchiveMember], archive_format: str) -> list[str]:
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
def open_archive(archive: Path) -> Iterator[tuple[str, list[ArchiveMember], object]]:
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


def extract_members(
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
    refuse_existing(target)
    with open_archive(Path(archive)) as (archive_format, members, handle):
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
        with building_directory(target) as building:
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
            publish_directory(building.joinpath(*root), target)
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
    return extract_members(Path(archive), Path(target))
