"""Dataset sources (sroc/datasets/): download, safe extraction, MVTec, elpv, synthetic."""

from __future__ import annotations

import filecmp
import hashlib
import io
import json
import logging
import re
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from sroc.datasets import (
    SYNTHETIC_TEXTURES,
    DownloadError,
    UnsafeArchiveError,
    download_file,
    elpv_defect_type,
    extract_archive_safely,
    make_synthetic_dataset,
    prepare_elpv,
    prepare_mvtec,
    verify_sha256,
)
from sroc.datasets.layout import (
    DatasetError,
    index_category,
    list_categories,
    read_image,
    read_mask,
)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_files(root: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under root (symlinked files read through)."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------------------
# A loopback HTTP server (127.0.0.1 only) with optional Range support and early disconnects


class FileServer(ThreadingHTTPServer):
    def __init__(self):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.honour_range = True
        self.send_at_most: int | None = None  # bytes sent before the connection is dropped
        self.requests: list[tuple[str, str | None]] = []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class RangeHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        requested_range = self.headers.get("Range")
        server.requests.append((self.path, requested_range))
        body = server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if requested_range and server.honour_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", requested_range).group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if server.send_at_most is not None:
            payload = payload[: server.send_at_most]
            self.close_connection = True
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = FileServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


def test_download_verifies_and_writes_atomically(tmp_path, http_server):
    http_server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "sub" / "data.bin"
    assert (
        download_file(http_server.url("/data.bin"), dest, sha256_of(PAYLOAD), progress=False)
        == dest
    )
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["data.bin"]
    # An existing verified file is reused without any request.
    download_file(http_server.url("/data.bin"), dest, sha256_of(PAYLOAD).upper(), progress=False)
    assert len(http_server.requests) == 1


def test_sha256_mismatch_names_both_hashes_and_keeps_no_dest(tmp_path, http_server):
    http_server.files["/data.bin"] = PAYLOAD
    dest = tmp_path / "data.bin"
    wrong = sha256_of(b"something else")
    with pytest.raises(DownloadError) as error:
        download_file(http_server.url("/data.bin"), dest, wrong, progress=False)
    message = str(error.value)
    assert wrong in message and sha256_of(PAYLOAD) in message and "Fix:" in message
    assert not dest.exists()
    assert (tmp_path / "data.bin.sha256-mismatch").read_bytes() == PAYLOAD
    with pytest.raises(DownloadError, match="expected .*actual"):
        verify_sha256(tmp_path / "data.bin.sha256-mismatch", wrong)
    with pytest.raises(DownloadError, match="64 hexadecimal"):
        download_file(http_server.url("/data.bin"), dest, "abc", progress=False)


def test_unpinned_download_logs_the_hash_to_pin(tmp_path, http_server, caplog):
    http_server.files["/data.bin"] = PAYLOAD
    with caplog.at_level(logging.WARNING, logger="sroc.datasets"):
        download_file(http_server.url("/data.bin"), tmp_path / "data.bin", None, progress=False)
    assert sha256_of(PAYLOAD) in caplog.text and "Pin it" in caplog.text


def test_interrupted_download_resumes_with_a_range_request(tmp_path, http_server):
    http_server.files["/data.bin"] = PAYLOAD
    http_server.send_at_most = 100_000
    dest = tmp_path / "data.bin"
    with pytest.raises(DownloadError, match="interrupted after 100000 of 300000 bytes"):
        download_file(http_server.url("/data.bin"), dest, sha256_of(PAYLOAD), progress=False)
    part = tmp_path / ".data.bin.part"
    assert part.read_bytes() == PAYLOAD[:100_000] and not dest.exists()
    http_server.send_at_most = None
    download_file(http_server.url("/data.bin"), dest, sha256_of(PAYLOAD), progress=False)
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert http_server.requests[-1] == ("/data.bin", "bytes=100000-")


def test_server_ignoring_range_restarts_from_zero(tmp_path, http_server):
    http_server.files["/data.bin"] = PAYLOAD
    http_server.honour_range = False
    (tmp_path / ".data.bin.part").write_bytes(b"stale bytes from another file")
    dest = download_file(
        http_server.url("/data.bin"), tmp_path / "data.bin", sha256_of(PAYLOAD), progress=False
    )
    assert dest.read_bytes() == PAYLOAD


def test_complete_partial_file_is_finished_on_416(tmp_path, http_server):
    http_server.files["/data.bin"] = PAYLOAD
    (tmp_path / ".data.bin.part").write_bytes(PAYLOAD)
    dest = download_file(
        http_server.url("/data.bin"), tmp_path / "data.bin", sha256_of(PAYLOAD), progress=False
    )
    assert dest.read_bytes() == PAYLOAD


def test_http_errors_are_explained(tmp_path, http_server):
    with pytest.raises(DownloadError, match="HTTP 404.*Fix:"):
        download_file(http_server.url("/missing"), tmp_path / "x", None, progress=False)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------
# Safe extraction


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    """A tiny MVTec-layout dataset (2 categories) plus a licence file at its root."""
    root = tmp_path_factory.mktemp("tree") / "mvtec_anomaly_detection"
    make_synthetic_dataset(
        root,
        categories=("bottle", "cable"),
        image_size=32,
        n_train=3,
        n_test_good=1,
        n_test_per_defect=1,
    )
    (root / "license.txt").write_text("CC BY-NC-SA 4.0\n")
    return root


def make_tar(path: Path, source: Path, arcname: str, mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as archive:
        archive.add(source, arcname=arcname)
    return path


def make_zip(path: Path, source: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(source.rglob("*")):
            archive.write(file, prefix + str(file.relative_to(source)))
    return path


@pytest.mark.parametrize("kind", ["tar.gz", "tar.xz", "zip"])
def test_extracts_a_built_archive_exactly(tmp_path, small_tree, kind):
    if kind == "zip":
        archive = make_zip(tmp_path / "a.zip", small_tree)
    else:
        archive = make_tar(tmp_path / f"a.{kind}", small_tree, ".", f"w:{kind.split('.')[1]}")
    target = tmp_path / "out" / "mvtec"
    assert extract_archive_safely(archive, target) == target
    assert tree_files(target) == tree_files(small_tree)
    assert len(index_category(target, "cable")) == len(index_category(small_tree, "cable"))
    assert sorted(p.name for p in target.parent.iterdir()) == ["mvtec"]  # no temporary left


def add_member(
    archive: tarfile.TarFile, name: str, kind=tarfile.REGTYPE, link="", data=b"x"
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


# Each case: members after a valid one, and the member the refusal must name.
MALICIOUS_TAR = {
    "parent_folder": ([("../evil.txt", tarfile.REGTYPE, "")], "../evil.txt"),
    "windows_parent": ([("cat\\..\\..\\evil.txt", tarfile.REGTYPE, "")], "evil.txt"),
    "absolute": ([("/tmp/sroc-test-absolute.txt", tarfile.REGTYPE, "")], "absolute path"),
    "symlink_absolute": ([("cat/etc", tarfile.SYMTYPE, "/etc")], "absolute path '/etc'"),
    "symlink_outside": ([("cat/up", tarfile.SYMTYPE, "../../outside")], "outside the target"),
    "hardlink_outside": ([("cat/hard", tarfile.LNKTYPE, "../outside.txt")], "outside"),
    "hardlink_absolute": ([("cat/passwd", tarfile.LNKTYPE, "/etc/passwd")], "absolute path"),
    "write_through_symlink": (
        [("cat/here", tarfile.SYMTYPE, "."), ("cat/here/x.txt", tarfile.REGTYPE, "")],
        "written through a symlink",
    ),
    "symlink_chain_escape": (
        [("cat/here", tarfile.SYMTYPE, "."), ("cat/esc", tarfile.SYMTYPE, "here/../..")],
        "through another symlink",
    ),
    "device": ([("cat/null", tarfile.CHRTYPE, "")], "special file"),
    "duplicate": ([("cat/readme.txt", tarfile.SYMTYPE, "good.txt")], "appears twice"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS_TAR))
def test_malicious_tar_is_refused_before_anything_is_written(tmp_path, case):
    members, named = MALICIOUS_TAR[case]
    work = tmp_path / "work"
    work.mkdir()
    archive_path = tmp_path / "bad.tar.gz"
    with tarfile.open(archive_path, "w:gz") as archive:
        add_member(archive, "cat/good.txt")
        add_member(archive, "cat/readme.txt")
        for name, kind, link in members:
            add_member(archive, name, kind, link)
    with pytest.raises(UnsafeArchiveError, match="nothing was extracted") as error:
        extract_archive_safely(archive_path, work / "target")
    assert named in str(error.value)
    assert list(work.iterdir()) == []  # no target, no temporary folder
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "outside").exists()
    assert not Path("/tmp/sroc-test-absolute.txt").exists()


@pytest.mark.parametrize(
    "name, external_attr, data, named",
    [
        ("../evil.txt", 0o100644 << 16, b"x", "parent-folder"),
        ("/abs.txt", 0o100644 << 16, b"x", "absolute path"),
        ("cat/link", 0o120777 << 16, b"/etc", "symlink"),
    ],
)
def test_malicious_zip_is_refused(tmp_path, name, external_attr, data, named):
    archive_path = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("cat/good.txt", b"fine")
        info = zipfile.ZipInfo(name)
        info.external_attr = external_attr
        archive.writestr(info, data)
    assert name in [i.filename for i in zipfile.ZipFile(archive_path).infolist()]
    with pytest.raises(UnsafeArchiveError, match=named):
        extract_archive_safely(archive_path, tmp_path / "target")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip"]


def test_zip_entries_with_or_without_file_type_bits_are_files(tmp_path):
    archive_path = tmp_path / "ok.zip"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("cat/plain.txt", b"a")  # permission bits only (0o600), no type bits
        typed = zipfile.ZipInfo("cat/typed.txt")
        typed.external_attr = 0o100644 << 16
        archive.writestr(typed, b"b")
        fifo = zipfile.ZipInfo("cat/fifo")
        fifo.external_attr = 0o010644 << 16
        archive.writestr(fifo, b"")
    with pytest.raises(UnsafeArchiveError, match="'cat/fifo': special file") as error:
        extract_archive_safely(archive_path, tmp_path / "target")
    assert "plain.txt" not in str(error.value) and "typed.txt" not in str(error.value)


def test_links_that_stay_inside_are_extracted(tmp_path):
    archive_path = tmp_path / "ok.tar"
    with tarfile.open(archive_path, "w") as archive:
        add_member(archive, "cat/sub/readme.txt", data=b"hello")
        add_member(archive, "cat/link", tarfile.SYMTYPE, "sub/readme.txt")
        add_member(archive, "cat/sub/up", tarfile.SYMTYPE, "../link")
        add_member(archive, "cat/hard", tarfile.LNKTYPE, "cat/sub/readme.txt")
    target = extract_archive_safely(archive_path, tmp_path / "target")
    assert (target / "cat" / "link").is_symlink()
    assert (target / "cat" / "sub" / "up").read_bytes() == b"hello"
    assert (target / "cat" / "hard").read_bytes() == b"hello"


def test_existing_target_corrupt_and_foreign_files_are_refused(tmp_path, small_tree):
    archive = make_tar(tmp_path / "a.tar.gz", small_tree, ".")
    occupied = tmp_path / "occupied"
    (occupied / "keep.txt").parent.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(DatasetError, match="already exists"):
        extract_archive_safely(archive, occupied)
    assert (occupied / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    extract_archive_safely(archive, tmp_path / "empty")  # an empty folder is replaced
    assert (tmp_path / "empty" / "license.txt").exists()

    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        extract_archive_safely(truncated, tmp_path / "from_cut")
    (tmp_path / "notes.txt").write_text("not an archive")
    with pytest.raises(DatasetError, match="not a tar"):
        extract_archive_safely(tmp_path / "notes.txt", tmp_path / "from_notes")
    assert not (tmp_path / "from_cut").exists() and not (tmp_path / "from_notes").exists()
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


# ------------------------------------------------------------------------------------------
# MVTec AD


def test_prepare_mvtec_from_an_archive_unwraps_and_selects_categories(tmp_path, small_tree):
    archive = make_tar(tmp_path / "mvtec.tar.xz", small_tree, "mvtec_anomaly_detection", "w:xz")
    target = tmp_path / "data" / "mvtec"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        prepare_mvtec(target, archive=archive, sha256="0" * 64)
    assert not target.exists()
    prepare_mvtec(
        target, archive=archive, sha256=sha256_of(archive.read_bytes()), categories=["bottle"]
    )
    assert list_categories(target) == ["bottle"]
    assert (target / "license.txt").exists()
    expected = {k: v for k, v in tree_files(small_tree).items() if not k.startswith("cable")}
    assert tree_files(target) == expected
    with pytest.raises(DatasetError, match="categories grid are missing"):
        prepare_mvtec(tmp_path / "other", archive=archive, sha256=None, categories=["grid"])


def test_prepare_mvtec_downloads_when_no_copy_is_named(tmp_path, small_tree, http_server):
    archive = make_tar(tmp_path / "served.tar.xz", small_tree, ".", "w:xz")
    http_server.files["/mvtec.tar.xz"] = archive.read_bytes()
    target = tmp_path / "resources" / "mvtec"
    prepare_mvtec(
        target,
        url=http_server.url("/mvtec.tar.xz"),
        categories=["bottle", "cable"],
        sha256=sha256_of(archive.read_bytes()),
        progress=False,
    )
    assert tree_files(target) == tree_files(small_tree)
    assert (tmp_path / "resources" / "mvtec.tar.xz").read_bytes() == archive.read_bytes()


def test_prepare_mvtec_links_an_extracted_root(tmp_path, small_tree):
    target = prepare_mvtec(tmp_path / "mvtec", source_root=small_tree, categories=["cable"])
    assert target.is_symlink() and target.resolve() == small_tree.resolve()
    assert list_categories(target) == ["bottle", "cable"]
    with pytest.raises(DatasetError, match="categories wood are missing"):
        prepare_mvtec(tmp_path / "mvtec2", source_root=small_tree, categories=["cable", "wood"])


# ------------------------------------------------------------------------------------------
# elpv


LEVELS = {"0": 0.0, "1/3": 0.3333333333333333, "2/3": 0.6666666666666666, "1": 1.0}


@pytest.fixture
def fake_elpv(tmp_path) -> Path:
    """labels.csv in elpv's format: 8 mono goods, 2 mono per other level, 4 poly goods."""
    source = tmp_path / "elpv_source"
    rows = [("0", "mono")] * 8 + [("1/3", "mono"), ("2/3", "mono"), ("1", "mono")] * 2
    rows += [("0", "poly")] * 4 + [("1", "poly")]
    order = np.random.default_rng(0).permutation(len(rows))  # labels are not sorted by level
    lines = []
    for number, row in enumerate(order, start=1):
        level, module = rows[row]
        name = f"images/cell{number:04d}.png"
        pixels = np.full((6, 6), number, np.uint8)
        (source / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(source / name)
        lines.append(f"{name}  {LEVELS[level]!r:<20} {module}")
    (source / "labels.csv").write_text("\n".join(lines) + "\n")
    return source


def read_labels(source: Path) -> list[tuple[str, float, str]]:
    return [
        (line.split()[0].split("/")[1], float(line.split()[1]), line.split()[2])
        for line in (source / "labels.csv").read_text().splitlines()
    ]


def test_elpv_mapping_split_and_bytes(tmp_path, fake_elpv):
    target = prepare_elpv(
        tmp_path / "elpv",
        good_probabilities=[0.0],
        defective_probabilities=[0.6666666666666666, 1.0],
        test_good_every=3,
        source=fake_elpv,
    )
    labels = read_labels(fake_elpv)
    for module in ("mono", "poly"):
        goods = sorted(name for name, p, m in labels if m == module and p == 0)
        files = {
            k: sorted(Path(f).name for f in tree_files(target / module) if f.startswith(k))
            for k in ("train/good", "test/good", "test/defect_p067", "test/defect_p100")
        }
        assert files["test/good"] == goods[2::3]  # the 3rd, 6th, ... good cell
        assert files["train/good"] == [g for g in goods if g not in goods[2::3]]
        for folder, level in (("test/defect_p067", LEVELS["2/3"]), ("test/defect_p100", 1.0)):
            assert files[folder] == sorted(n for n, p, m in labels if m == module and p == level)
    # The ambiguous level 1/3 is excluded everywhere; files are copied unchanged.
    assert not list(target.rglob("*p033*"))
    for path in target.rglob("*.png"):
        assert filecmp.cmp(path, fake_elpv / "images" / path.name, shallow=False)
    info = json.loads((target / "dataset_info.json").read_text())
    assert info["counts"]["mono"] == {
        "test/defect_p067": 2,
        "test/defect_p100": 2,
        "test/good": 2,
        "train/good": 6,
        "excluded": 2,
    }
    assert info["excluded_probabilities"] == [LEVELS["1/3"]]
    index = index_category(target, "mono", require_masks=False)
    assert (index["mask_path"] == "").all() and index["label"].sum() == 4


def test_elpv_mapping_is_configurable_with_fractions(tmp_path, fake_elpv):
    target = prepare_elpv(
        tmp_path / "elpv",
        good_probabilities=["0"],
        defective_probabilities=["1/3", "2/3", 1],
        test_good_every=2,
        source=fake_elpv,
    )
    assert len(list((target / "mono" / "test" / "defect_p033").iterdir())) == 2
    assert len(list((target / "mono" / "test" / "good").iterdir())) == 4
    assert elpv_defect_type(2 / 3) == "defect_p067" and elpv_defect_type(1.0) == "defect_p100"


@pytest.mark.parametrize(
    "good, defective, every, message",
    [
        ([0.0], [0.5], 3, "matches none"),
        ([0.0, 1.0], [1.0], 3, "both good and defective"),
        ([0.0], [1.0], 1, "integer >= 2"),
        ([0.0], [], 3, "at least one"),
        (["zero"], [1.0], 3, "not a probability"),
    ],
)
def test_elpv_bad_mapping_is_refused(tmp_path, fake_elpv, good, defective, every, message):
    with pytest.raises(DatasetError, match=message):
        prepare_elpv(tmp_path / "elpv", good, defective, every, source=fake_elpv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elpv_source"]


def test_elpv_from_the_installed_package_is_quick(tmp_path):
    pytest.importorskip("elpv_dataset")
    start = time.perf_counter()
    target = prepare_elpv(tmp_path / "elpv")
    elapsed = time.perf_counter() - start
    from importlib import resources

    labels = read_labels(Path(str(resources.files("elpv_dataset") / "data")))
    for module in ("mono", "poly"):
        index = index_category(target, module, require_masks=False, verify_pixels=False)
        counts = index.groupby(["origin", "defect_type"]).size().to_dict()
        goods = sum(1 for _, p, m in labels if m == module and p == 0)
        assert counts[("test", "good")] == goods // 3
        assert counts[("train", "good")] == goods - goods // 3
        assert counts[("test", "defect_p100")] == sum(
            1 for _, p, m in labels if m == module and p == 1
        )
        assert counts[("test", "defect_p067")] == sum(
            1 for _, p, m in labels if m == module and 0.6 < p < 0.7
        )
        assert ("test", "defect_p033") not in counts
    assert elapsed < 60, f"prepare_elpv took {elapsed:.1f} s"


# ------------------------------------------------------------------------------------------
# Synthetic


SMALL = dict(image_size=64, n_train=4, n_test_good=2, n_test_per_defect=2)


def test_synthetic_same_seed_gives_identical_bytes(tmp_path):
    first = make_synthetic_dataset(tmp_path / "a", seed=7, **SMALL)
    second = make_synthetic_dataset(tmp_path / "b", seed=7, **SMALL)
    other = make_synthetic_dataset(tmp_path / "c", seed=8, **SMALL)
    files = tree_files(first)
    assert files == tree_files(second)
    assert files.keys() == tree_files(other).keys()
    assert sum(files[k] != v for k, v in tree_files(other).items()) > 0.9 * len(files)


def test_synthetic_layout_masks_and_arbitrary_category_names(tmp_path):
    root = make_synthetic_dataset(
        tmp_path / "syn",
        categories=("grid_texture", "bottle"),
        image_size=32,
        n_train=5,
        n_test_good=3,
        n_test_per_defect=2,
        defect_types=("scratch", "stain"),
    )
    assert list_categories(root) == ["bottle", "grid_texture"]
    for category in ("bottle", "grid_texture"):
        index = index_category(root, category)
        counts = index.groupby(["origin", "defect_type"]).size().to_dict()
        assert counts == {
            ("train", "good"): 5,
            ("test", "good"): 3,
            ("test", "scratch"): 2,
            ("test", "stain"): 2,
        }
        for row in index.itertuples():
            image = read_image(row.path)
            assert image.shape == (32, 32, 3)
            if row.label:
                area = read_mask(row.mask_path, image.shape[:2]).mean()
                assert 0.002 < area < 0.25, (row.image_id, area)


def test_synthetic_defects_are_visible_to_a_raw_pixel_patch_detector(tmp_path):
    """Nearest-neighbour distance of 5x5 colour patches (at half resolution) to training patches
    must localise every defect type: pixel AUROC against the masks above 0.95."""
    root = make_synthetic_dataset(
        tmp_path / "syn",
        categories=("grid_texture", "dot_texture"),
        n_train=8,
        n_test_good=3,
        n_test_per_defect=3,
    )

    def patches(image):
        small = image.astype(float).reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
        padded = np.pad(small, ((2, 2), (2, 2), (0, 0)), mode="reflect")
        windows = np.lib.stride_tricks.sliding_window_view(padded, (5, 5), axis=(0, 1))
        return windows.reshape(64 * 64, -1)

    for category in ("grid_texture", "dot_texture"):
        index = index_category(root, category)
        bank = np.concatenate(
            [patches(read_image(p)) for p in index.loc[index.origin == "train", "path"]]
        )
        bank = bank[np.random.default_rng(0).choice(len(bank), 2000, replace=False)]
        test = index[index.origin == "test"]
        maps, masks = [], []
        for row in test.itertuples():
            query = patches(read_image(row.path))
            squared = (query**2).sum(1)[:, None] + (bank**2).sum(1)[None] - 2 * query @ bank.T
            maps.append(squared.min(1).reshape(64, 64).repeat(2, 0).repeat(2, 1))
            masks.append(read_mask(row.mask_path) if row.mask_path else np.zeros((128, 128), bool))
        maps, masks = np.array(maps), np.array(masks)
        for defect_type in ("scratch", "spot", "stain"):
            rows = (test.defect_type == defect_type).to_numpy() | (test.label == 0).to_numpy()
            auroc = roc_auc_score(masks[rows].ravel(), maps[rows].ravel())
            assert auroc > 0.95, (category, defect_type, auroc)


def test_synthetic_defect_scale_grows_every_defect_and_leaves_good_images_alone(tmp_path):
    """At scale 2 each defect's mask covers about 4x the area (the scratch about 2x wider and
    longer); good images are byte-identical, as are the defaults at scale 1."""
    options = dict(categories=("dot_texture",), image_size=96, n_train=2, n_test_per_defect=4)
    plain = make_synthetic_dataset(tmp_path / "plain", **options)
    assert tree_files(plain) == tree_files(
        make_synthetic_dataset(tmp_path / "one", defect_scale=1, **options)
    )
    larger = make_synthetic_dataset(tmp_path / "larger", defect_scale=2.0, **options)
    before, after = index_category(plain, "dot_texture"), index_category(larger, "dot_texture")
    good = before["label"] == 0
    pairs = zip(before.loc[good, "path"], after.loc[good, "path"], strict=True)
    assert all((read_image(a) == read_image(b)).all() for a, b in pairs)
    for defect_type in ("scratch", "spot", "stain"):
        rows = before["defect_type"] == defect_type
        areas = [
            np.mean([read_mask(p).mean() for p in frame.loc[rows, "mask_path"]])
            for frame in (before, after)
        ]
        assert 2.5 < areas[1] / areas[0] < 6, (defect_type, areas)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(defect_types=("crack",)), "defect_types"),
        (dict(n_train=0), "n_train"),
        (dict(image_size=8), "image_size"),
        (dict(categories=("a/b",)), "folder names"),
        (dict(categories=("x", "x")), "distinct"),
        (dict(defect_scale=0), "defect_scale"),
        (dict(defect_scale=4.5), "defect_scale"),
        (dict(defect_scale="2"), "defect_scale"),
    ],
)
def test_synthetic_bad_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(DatasetError, match=message):
        make_synthetic_dataset(tmp_path / "syn", **kwargs)
    assert not (tmp_path / "syn").exists()


def test_synthetic_refuses_to_overwrite(tmp_path):
    root = make_synthetic_dataset(tmp_path / "syn", **SMALL)
    with pytest.raises(DatasetError, match="already exists"):
        make_synthetic_dataset(root, **SMALL)
    assert set(SYNTHETIC_TEXTURES) == {"grid_texture", "dot_texture", "stripe_texture"}
