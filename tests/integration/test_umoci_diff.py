"""Differential test: the merged view of a strata mount equals `umoci unpack`'s rootfs.

Both read the same multi-layer OCI image built from real files, including the cases where
overlay semantics are subtle: whiteouts of files and whole directories, opaque directories,
a directory replaced by a file and a file by a directory, re-creation inside a deleted
directory, symlinks, hardlinks, owners, set-id bits and xattrs.
"""

import hashlib
import os
import shutil
import stat
import subprocess
import sysconfig

import pytest

from csi.image.build import LayerBuilder, write_image
from tests.conftest import ROOT_REASON, app_layer, base_layer

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason=ROOT_REASON),
    # In CI a missing umoci is a failure (.ci/run installs it), not a skip.
    pytest.mark.skipif(shutil.which("umoci") is None and not os.environ.get("CI"),
                       reason="umoci is not installed "
                       "(apt-get install umoci; .ci/run does)"),
]

STDLIB = sysconfig.get_paths()["stdlib"]


def layers() -> list[LayerBuilder]:
    one = base_layer().tree(os.path.join(STDLIB, "email"), "usr/lib/python3/email")
    for pkg in ("http", "asyncio", "xml", "unittest", "logging"):
        one.tree(os.path.join(STDLIB, pkg), f"usr/lib/python3/{pkg}")
    one.dir("opt").dir("opt/replace-me").file("opt/replace-me/inner", "inner\n")
    one.file("opt/becomes-dir", "file\n")
    one.dir("opt/gone").file("opt/gone/a", "a\n").file("opt/gone/b", "b\n")
    two = app_layer()
    two.whiteout("usr/lib/python3/http")  # a whole directory deleted
    two.whiteout("opt/replace-me")
    two.file("opt/replace-me", "now a file\n", mode=0o600, uid=33, gid=33)
    two.whiteout("opt/becomes-dir")
    two.dir("opt/becomes-dir", mode=0o750).file("opt/becomes-dir/x", "x\n")
    two.whiteout("opt/gone")
    two.symlink("usr/bin/python", "/usr/lib/python3/email/__init__.py")
    two.file("usr/bin/pair", "pair\n").hardlink("usr/bin/pair-link", "usr/bin/pair")
    two.file("usr/lib/python3/email/utils.py", "# patched\n", mode=0o644, uid=1, gid=2)
    three = LayerBuilder()
    three.dir("opt/gone").file("opt/gone/c", "back again\n")  # re-created after deletion
    three.opaque("usr/lib/python3/email/mime")
    three.file("usr/lib/python3/email/mime/only.py", "only\n")
    three.file("etc/motd", "third motd\n", xattrs={"user.layer": "three"})
    three.file("usr/bin/sgid", "sgid", mode=0o2755, gid=50)
    return [one, two, three]


def snapshot(root: str) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            entry = [kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
            if stat.S_ISREG(kind):
                with open(p, "rb") as f:
                    entry += [st.st_size, hashlib.sha256(f.read()).hexdigest(), st.st_mtime]
                # hardlink groups: name the group by its first member
                if st.st_nlink > 1:
                    entry.append(inodes.setdefault(st.st_ino, rel))
            elif stat.S_ISLNK(kind):
                entry += [os.readlink(p)]
            xattrs = {} if stat.S_ISLNK(kind) else {
                k: os.getxattr(p, k) for k in os.listxattr(p) if k.startswith("user.")}
            entry.append(tuple(sorted(xattrs.items())))
            out[rel] = tuple(entry)
    return out


def test_merged_view_equals_umoci_unpack(csi, pods, tmp_path):
    layout = str(tmp_path / "layout")
    write_image(layout, "diff", layers())
    bundle = str(tmp_path / "bundle")
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:diff", bundle], check=True,
                   capture_output=True)
    target = pods / "merged"
    csi.publish("umoci-diff", target, f"oci:{layout}:diff", readonly=True)
    try:
        ours, theirs = snapshot(str(target)), snapshot(os.path.join(bundle, "rootfs"))
    finally:
        csi.unpublish("umoci-diff", target)
    assert len(theirs) > 300, "the image should be realistic"
    missing, extra = sorted(theirs.keys() - ours.keys()), sorted(ours.keys() - theirs.keys())
    assert not missing and not extra, f"only in umoci: {missing[:10]}; only in strata: {extra[:10]}"
    differ = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert not differ, f"{len(differ)} entries differ, e.g. {list(differ.items())[:5]}"
    # the cases that matter, spelled out
    assert "usr/lib/python3/http" not in ours
    assert "opt/gone/a" not in ours and "opt/gone/c" in ours
    assert sorted(k for k in ours if k.startswith("usr/lib/python3/email/mime/")) == [
        "usr/lib/python3/email/mime/only.py"]
