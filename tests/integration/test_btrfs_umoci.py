"""The umoci differential test (test_umoci_diff.py) on the btrfs backend: a publication's
tree, built by applying the layers onto snapshots (whiteouts as deletions, opaque
directories, a directory replaced by a file and back, hard links, owners, set-id bits,
xattrs), equals `umoci unpack`'s rootfs, for a read-only and a writable publication."""

import os
import subprocess
import uuid

import pytest

from csi.image.build import write_image
from tests.conftest import StrataProcess, unmount_all_under
from tests.integration.test_umoci_diff import layers, pytestmark, snapshot  # noqa: F401
from tests.storefs import delete_subvolumes, store_fs


@pytest.fixture(scope="module")
def served(store_filesystems, tmp_path_factory):
    root = os.path.join(store_fs(store_filesystems, "btrfs").root, f"umoci-{uuid.uuid4().hex}")
    base = str(tmp_path_factory.mktemp("strata-btrfs-umoci"))
    proc = StrataProcess(base, root=root, extra_args=("--backend", "btrfs")).start()
    try:
        yield proc
    finally:
        proc.stop()
        unmount_all_under(base)
        delete_subvolumes(root)


def groups(tree: dict[str, tuple]) -> dict[str, tuple]:
    """`snapshot` names a hard-link group by the member its walk met first, which depends
    on the filesystem's directory order (btrfs and umoci's ext4/tmpfs differ): name it by
    all its members instead."""
    members: dict[str, list[str]] = {}
    for rel, entry in tree.items():
        if len(entry) == 9:  # a regular file with a link group
            members.setdefault(entry[7], []).append(rel)
    return {rel: (entry[:7] + (tuple(sorted(members[entry[7]])),) + entry[8:]
                  if len(entry) == 9 else entry) for rel, entry in tree.items()}


@pytest.mark.parametrize("readonly", [True, False], ids=["ro", "rw"])
def test_the_snapshot_equals_umoci_unpack(served, tmp_path, readonly):
    layout = str(tmp_path / "layout")
    write_image(layout, "diff", layers())
    bundle = str(tmp_path / "bundle")
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:diff", bundle], check=True,
                   capture_output=True)
    target = tmp_path / "merged"
    served.csi.publish("umoci-btrfs", target, f"oci:{layout}:diff", readonly=readonly)
    try:
        ours = groups(snapshot(str(target)))
        theirs = groups(snapshot(os.path.join(bundle, "rootfs")))
    finally:
        served.csi.unpublish("umoci-btrfs", target)
    assert len(theirs) > 300, "the image should be realistic"
    missing, extra = sorted(theirs.keys() - ours.keys()), sorted(ours.keys() - theirs.keys())
    assert not missing and not extra, f"only in umoci: {missing[:10]}; only in strata: {extra[:10]}"
    differ = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not differ, f"{len(differ)} entries differ, e.g. {list(differ.items())[:5]}"
    assert "usr/lib/python3/http" not in ours
    assert "opt/gone/a" not in ours and "opt/gone/c" in ours
