"""csi/store/pagecache.py: resident bytes by cachestat(2) and by mmap + mincore(2)."""

import os
import subprocess

import pytest

from csi.store.pagecache import PAGE, Meter, cachestat_pages

SIZE = 64 * PAGE


def evictable(path) -> bool:
    """tmpfs pages *are* the file: POSIX_FADV_DONTNEED cannot drop them."""
    out = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return out.stdout.strip() not in ("tmpfs", "ramfs")


def cold_file(path) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be dropped
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def has_cachestat(path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return cachestat_pages(fd) is not None
    finally:
        os.close(fd)


@pytest.mark.parametrize("use_cachestat", [True, False], ids=["cachestat", "mincore"])
def test_a_read_shows_up_as_resident_and_an_eviction_drops_it(tmp_path, use_cachestat):
    path = tmp_path / "f"
    cold_file(path)
    if use_cachestat and not has_cachestat(path):
        pytest.skip("this kernel has no cachestat(2) (Linux 6.5); mincore covers it")
    meter = Meter(use_cachestat=use_cachestat)
    if evictable(path):
        assert meter.file(str(path)) == 0
    with open(path, "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead
        f.seek(8 * PAGE)
        f.read(4 * PAGE)
    resident = meter.file(str(path))
    assert 4 * PAGE <= resident <= SIZE
    if evictable(path):
        assert resident < SIZE, "only what was read (and maybe read ahead)"


def test_both_methods_agree_and_a_tree_sums_its_regular_files(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("a", "d/b"):
        (tmp_path / name).write_bytes(os.urandom(3 * PAGE + 10))  # written: resident
    (tmp_path / "empty").write_bytes(b"")
    os.symlink("/etc/passwd", tmp_path / "link")  # not followed out of the tree
    os.mkfifo(tmp_path / "fifo")  # not opened (it would block)
    by_mincore = Meter(use_cachestat=False).tree(str(tmp_path))
    assert by_mincore == 2 * (3 * PAGE + 10)
    assert Meter().tree(str(tmp_path)) == by_mincore
