"""A corpus of hostile container-image layer tarballs, built deterministically with tarfile.

Each case is one layer tar (plus, for a few, a benign base layer below it) and what a safe
unpacker must do with it:

- REFUSED: the layer is rejected as a whole (an error, no layer recorded, nothing left).
- CONTAINED: the layer is accepted, but every entry lands inside the layer directory
  (absolute names and `..` are re-rooted at the layer root, as containerd's archive.Apply
  does), and per-case checks say where.
- EITHER: both outcomes are defensible (documented in `why`); containment is still checked.

The sandbox geometry the cases rely on (see `populate_outside`): the store root is
`SANDBOX/store` and an `outside/` directory sits beside it, `SANDBOX/outside`. A layer is
unpacked in `store/tmp/unpack-*/fs` and then lives in `store/layers/ID/fs`: both are three
levels below the store root. So from an entry at the top of the layer, the relative symlink
target `ESCAPE` = `../../../../outside` names `SANDBOX/outside` *on the host*: if anything is
ever done through such a link by the host kernel instead of being re-rooted, it lands in
`outside/`, which the test snapshots.

This module is plain stdlib (no strata imports), so the corpus can be fed to any unpacker.
"""

import dataclasses
import gzip
import hashlib
import io
import json
import os
import platform
import random
import stat
import tarfile
from collections.abc import Callable

REFUSED, CONTAINED, EITHER = "refused", "contained", "either"
EPOCH = 1_700_000_000
OUTSIDE_MTIME = 1_000_000_000  # every outside path carries this mtime: changes show
STORE, OUTSIDE, LAYOUT = "store", "outside", "layout"
ESCAPE = "../../../../" + OUTSIDE  # from fs/<top-level entry> to SANDBOX/outside on the host
SENTINEL = b"sentinel: must never change\n"

TAR_MT = "application/vnd.oci.image.layer.v1.tar"
GZIP_MT = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"

Entry = tuple[tarfile.TarInfo, bytes | None]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tar: bytes                  # the uncompressed layer: its sha256 is the DiffID
    expect: str                 # REFUSED, CONTAINED or EITHER
    gzip: bool = False          # store the blob gzip'd (media type tar+gzip)
    blob: bytes | None = None   # the stored blob verbatim (broken compression cases)
    base: bytes | None = None   # a benign uncompressed base layer, unpacked first
    check: Callable[[str], None] | None = None  # extra check on the layer's fs/ (accepted)
    why: str = ""               # for EITHER: why both outcomes are acceptable

    @property
    def diff_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.tar).hexdigest()

    @property
    def media_type(self) -> str:
        return GZIP_MT if self.gzip else TAR_MT

    def blob_bytes(self) -> bytes:
        if self.blob is not None:
            return self.blob
        return gzip.compress(self.tar, mtime=0) if self.gzip else self.tar


# -- tar entries -----------------------------------------------------------------------------
def _ti(name: str, type_: bytes, mode: int, uid: int = 0, gid: int = 0, mtime: int = EPOCH,
        pax: dict[str, str] | None = None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode, ti.uid, ti.gid, ti.mtime = type_, mode, uid, gid, mtime
    ti.uname = ti.gname = ""
    if pax:
        ti.pax_headers = dict(pax)
    return ti


def reg(name: str, data: bytes | str = b"", mode: int = 0o644, uid: int = 0, gid: int = 0,
        mtime: int = EPOCH, pax: dict[str, str] | None = None) -> Entry:
    data = data.encode() if isinstance(data, str) else data
    ti = _ti(name, tarfile.REGTYPE, mode, uid, gid, mtime, pax)
    ti.size = len(data)
    return ti, data


def xattrs(**kv: str) -> dict[str, str]:
    """pax records for xattrs; keyword names use '__' for '.' (trusted__overlay__opaque)."""
    return {"SCHILY.xattr." + k.replace("__", "."): v for k, v in kv.items()}


def dir_(name: str, mode: int = 0o755, mtime: int = EPOCH,
         pax: dict[str, str] | None = None) -> Entry:
    return _ti(name, tarfile.DIRTYPE, mode, mtime=mtime, pax=pax), None


def sym(name: str, target: str, pax: dict[str, str] | None = None) -> Entry:
    ti = _ti(name, tarfile.SYMTYPE, 0o777, pax=pax)
    ti.linkname = target
    return ti, None


def hard(name: str, target: str, pax: dict[str, str] | None = None) -> Entry:
    ti = _ti(name, tarfile.LNKTYPE, 0o644, pax=pax)
    ti.linkname = target
    return ti, None


def dev(name: str, type_: bytes, major: int, minor: int, mode: int = 0o666) -> Entry:
    ti = _ti(name, type_, mode)
    ti.devmajor, ti.devminor = major, minor
    return ti, None


def tar(*entries: Entry, fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as tf:
        for ti, data in entries:
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def header_offsets(data: bytes) -> list[int]:
    """Offsets of each member's own 512-byte header (after any pax/GNU extension headers)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        return [m.offset_data - tarfile.BLOCKSIZE for m in tf.getmembers()]


def patch_header(data: bytes, offset: int, field: slice, raw: bytes) -> bytes:
    """Overwrite a raw header field and fix the header checksum, so only the field is bad."""
    assert len(raw) == field.stop - field.start
    hdr = bytearray(data[offset:offset + tarfile.BLOCKSIZE])
    hdr[field] = raw
    hdr[148:156] = b" " * 8
    hdr[148:155] = b"%06o\0" % sum(hdr)
    return data[:offset] + bytes(hdr) + data[offset + tarfile.BLOCKSIZE:]


NAME, SIZE = slice(0, 100), slice(124, 136)


def strip_end_marker(data: bytes) -> bytes:
    """The archive without its trailing zero blocks (end-of-archive marker and padding)."""
    return data.rstrip(b"\0") + b"\0" * (-len(data.rstrip(b"\0")) % tarfile.BLOCKSIZE)


# -- checks on the unpacked layer (fs = layers/ID/fs) ----------------------------------------
def _lst(fs: str, rel: str) -> os.stat_result:
    try:
        return os.lstat(os.path.join(fs, rel))
    except FileNotFoundError:
        raise AssertionError(f"{rel!r} is missing from the layer") from None


def is_file(fs: str, rel: str, content: bytes | str | None = None,
            mode: int | None = None) -> os.stat_result:
    st = _lst(fs, rel)
    if not stat.S_ISREG(st.st_mode):
        raise AssertionError(f"{rel!r} is not a regular file (mode {st.st_mode:o})")
    if content is not None:
        content = content.encode() if isinstance(content, str) else content
        with open(os.path.join(fs, rel), "rb") as f:
            got = f.read()
        if got != content:
            raise AssertionError(f"{rel!r} holds {got[:80]!r}, expected {content[:80]!r}")
    if mode is not None and stat.S_IMODE(st.st_mode) != mode:
        raise AssertionError(f"{rel!r} has mode {stat.S_IMODE(st.st_mode):o}, "
                             f"expected {mode:o}")
    return st


def is_dir(fs: str, rel: str, mode: int | None = None) -> None:
    st = _lst(fs, rel)
    if not stat.S_ISDIR(st.st_mode):
        raise AssertionError(f"{rel!r} is not a directory (mode {st.st_mode:o})")
    if mode is not None and stat.S_IMODE(st.st_mode) != mode:
        raise AssertionError(f"{rel!r} has mode {stat.S_IMODE(st.st_mode):o}, "
                             f"expected {mode:o}")


def is_link(fs: str, rel: str, target: str) -> None:
    st = _lst(fs, rel)
    if not stat.S_ISLNK(st.st_mode):
        raise AssertionError(f"{rel!r} is not a symlink (mode {st.st_mode:o})")
    got = os.readlink(os.path.join(fs, rel))
    if got != target:
        raise AssertionError(f"{rel!r} → {got!r}, expected → {target!r}")


def is_whiteout(fs: str, rel: str) -> None:
    st = _lst(fs, rel)
    if not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0):
        raise AssertionError(f"{rel!r} is not a 0:0 whiteout (mode {st.st_mode:o})")


def is_absent(fs: str, rel: str) -> None:
    if os.path.lexists(os.path.join(fs, rel)):
        raise AssertionError(f"{rel!r} exists but must not")


def same_inode(fs: str, a: str, b: str) -> None:
    sa, sb = _lst(fs, a), _lst(fs, b)
    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino):
        raise AssertionError(f"{a!r} and {b!r} are not one inode (not hardlinked)")


def xattr_is(fs: str, rel: str, name: str, value: bytes | None) -> None:
    path = os.path.join(fs, rel)
    try:
        got = os.getxattr(path, name, follow_symlinks=False)
    except OSError:
        got = None
    if got != value:
        raise AssertionError(f"xattr {name} on {rel!r} is {got!r}, expected {value!r}")


def all_of(*checks: Callable[[str], None]) -> Callable[[str], None]:
    def run(fs: str) -> None:
        for c in checks:
            c(fs)
    return run


def at(fn: Callable, *args, **kw) -> Callable[[str], None]:
    """A check bound to its arguments, waiting for fs."""
    return lambda fs: fn(fs, *args, **kw)


# -- the sandbox's outside directory ---------------------------------------------------------
def populate_outside(path: str) -> None:
    """Sentinels beside the store that no layer may touch: files, a dir with a child, a
    symlink target dir and a symlink to it, all with a fixed mtime."""
    os.makedirs(os.path.join(path, "d"))
    os.makedirs(os.path.join(path, "target"))
    files = {"sentinel": (SENTINEL, 0o644), "secret": (b"secret\n", 0o600),
             "d/inner": (b"inner\n", 0o644), "target/kept": (b"kept\n", 0o644)}
    for rel, (data, mode) in files.items():
        p = os.path.join(path, rel)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
    os.setxattr(os.path.join(path, "sentinel"), "user.sentinel", b"1")
    os.symlink("target", os.path.join(path, "link"))
    for rel in ("sentinel", "secret", "d/inner", "target/kept", "link", "d", "target", ""):
        p = os.path.join(path, rel)
        os.utime(p, (OUTSIDE_MTIME, OUTSIDE_MTIME), follow_symlinks=False)


# -- a minimal OCI image layout writer for raw blobs -----------------------------------------
def _arch() -> str:
    m = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(m, m)


def _blob(layout: str, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest[7:])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return {"digest": digest, "size": len(data)}


def write_layout(layout: str, tag: str, layers: list[tuple[bytes, str, str]]) -> str:
    """Add an image to the OCI layout at `layout`; `layers` are (blob, media type, DiffID),
    base first. Returns the `oci:/LAYOUT:TAG` reference."""
    os.makedirs(layout, exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    descs = [{"mediaType": mt, **_blob(layout, blob)} for blob, mt, _diff in layers]
    config = {"architecture": _arch(), "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [d for _b, _m, d in layers]}}
    cdesc = {"mediaType": OCI_CONFIG,
             **_blob(layout, json.dumps(config, sort_keys=True).encode())}
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cdesc, "layers": descs}
    mdesc = {"mediaType": OCI_MANIFEST,
             **_blob(layout, json.dumps(manifest, sort_keys=True).encode()),
             "annotations": {REF_NAME: tag}}
    index_path = os.path.join(layout, "index.json")
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path) as f:
            index = json.load(f)
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get(REF_NAME) != tag] + [mdesc]
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
    return f"oci:{os.path.abspath(layout)}:{tag}"


# -- the corpus ------------------------------------------------------------------------------
_BUILDERS: dict[str, Callable[[], dict]] = {}


def case(fn: Callable[[], dict]) -> Callable[[], dict]:
    _BUILDERS[fn.__name__] = fn
    return fn


def case_names() -> list[str]:
    """Every case's name, without building any tar (for parametrize at collection)."""
    return list(_BUILDERS)


def build_corpus() -> dict[str, Case]:
    return {name: Case(name=name, **fn()) for name, fn in _BUILDERS.items()}


def _base() -> bytes:
    return tar(dir_("etc"), reg("etc/passwd", "root:x:0:0::/root:/bin/sh\n"), reg("x", "base x"),
               dir_("keep"), reg("keep/f", "base"))


# absolute names and `..` ------------------------------------------------------------------
@case
def absolute_name():
    return dict(tar=tar(reg("/etc/x", "abs")), expect=CONTAINED, gzip=True,
                check=at(is_file, "etc/x", "abs"))


@case
def absolute_name_with_dotdot():
    return dict(tar=tar(reg("//../../../etc/y", "y"), dir_("/../../var/")), expect=CONTAINED,
                check=all_of(at(is_file, "etc/y", "y"), at(is_dir, "var")))


@case
def dotdot_relative():
    return dict(tar=tar(reg("../../x", "x")), expect=CONTAINED, check=at(is_file, "x", "x"))


@case
def dotdot_in_the_middle():
    return dict(tar=tar(dir_("a"), reg("a/../../x", "x"), reg("a/b/../../../../y", "y")),
                expect=CONTAINED,
                check=all_of(at(is_file, "x", "x"), at(is_file, "y", "y"), at(is_absent, "a/b")))


@case
def dotdot_to_the_outside_sentinel():
    return dict(tar=tar(reg(ESCAPE + "/sentinel", "pwned"), dir_(ESCAPE + "/d"),
                        reg(ESCAPE + "/d/inner", "pwned")),
                expect=CONTAINED,
                check=all_of(at(is_file, "outside/sentinel", "pwned"),
                             at(is_file, "outside/d/inner", "pwned")))


# symlinks -----------------------------------------------------------------------------------
@case
def symlink_parent_to_root():
    return dict(tar=tar(sym("etc", "/"), reg("etc/passwd", "mine")), expect=CONTAINED,
                check=all_of(at(is_link, "etc", "/"), at(is_file, "passwd", "mine")))


@case
def symlink_parent_dotdot():
    return dict(tar=tar(sym("up", "../../.."), reg("up/x", "x"), reg("up/up/y", "y")),
                expect=CONTAINED,
                check=all_of(at(is_link, "up", "../../.."), at(is_file, "x", "x"),
                             at(is_file, "y", "y")))


@case
def symlink_parent_to_outside():
    return dict(tar=tar(sym("out", ESCAPE), reg("out/sentinel", "pwned"),
                        reg("out/d/inner", "pwned")),
                expect=CONTAINED, gzip=True,
                check=all_of(at(is_link, "out", ESCAPE),
                             at(is_file, "outside/sentinel", "pwned"),
                             at(is_file, "outside/d/inner", "pwned")))


@case
def symlink_parent_to_outside_symlink():
    """A link to the host's outside/link (itself a symlink to outside/target)."""
    return dict(tar=tar(sym("l", ESCAPE + "/link"), reg("l/kept", "pwned")), expect=CONTAINED,
                check=at(is_file, "outside/link/kept", "pwned"))


@case
def symlink_chain():
    return dict(tar=tar(sym("a", "b"), sym("b", "c/"), sym("c", "./" + ESCAPE + "/d"),
                        reg("a/inner", "pwned")),
                expect=CONTAINED, check=at(is_file, "outside/d/inner", "pwned"))


@case
def symlink_loop():
    return dict(tar=tar(sym("a", "b"), sym("b", "a"), reg("a/x", "x")), expect=REFUSED)


@case
def symlink_self_loop():
    return dict(tar=tar(sym("a", "a"), reg("a/x", "x")), expect=REFUSED)


@case
def symlink_absolute_self_loop():
    return dict(tar=tar(sym("etc", "/etc"), reg("etc/x", "x")), expect=REFUSED)


@case
def symlink_chain_too_long():
    links = [sym(f"l{i}", f"l{i + 1}") for i in range(64)]
    return dict(tar=tar(dir_("l64"), *links, reg("l0/x", "x")), expect=REFUSED)


@case
def symlink_then_file_same_name():
    return dict(tar=tar(sym("x", ESCAPE + "/sentinel"), reg("x", "mine")), expect=CONTAINED,
                check=at(is_file, "x", "mine"))


@case
def file_then_symlink_same_name():
    return dict(tar=tar(reg("x", "mine"), sym("x", ESCAPE + "/sentinel")), expect=CONTAINED,
                check=at(is_link, "x", ESCAPE + "/sentinel"))


@case
def symlink_then_dir_same_name():
    return dict(tar=tar(sym("t", ESCAPE + "/d"), dir_("t", mode=0o700), reg("t/inner", "x")),
                expect=CONTAINED,
                check=all_of(at(is_dir, "t", 0o700), at(is_file, "t/inner", "x")))


@case
def dir_replaced_by_symlink_then_file():
    return dict(tar=tar(dir_("a"), reg("a/keep", "k"), sym("a", ESCAPE),
                        reg("a/sentinel", "pwned")),
                expect=CONTAINED,
                check=all_of(at(is_link, "a", ESCAPE), at(is_file, "outside/sentinel", "pwned")))


@case
def dir_mtime_through_replaced_parent():
    """Directory mtimes are applied after all entries; by then `a` is a symlink to the host's
    outside/, so a/d names the host's outside/d."""
    return dict(tar=tar(dir_("a"), dir_("a/d", mtime=12345), sym("a", ESCAPE)),
                expect=CONTAINED, check=at(is_link, "a", ESCAPE))


@case
def dir_mtime_through_hardlinked_symlink_parent():
    """The same, with the parent replaced by a hardlink to a symlink."""
    return dict(tar=tar(sym("s", ESCAPE), dir_("b"), dir_("b/d", mtime=54321),
                        dir_("b/target", mtime=54321), hard("b", "s")),
                expect=CONTAINED, check=at(is_link, "b", ESCAPE))


@case
def top_layer_symlink_over_base_dir():
    return dict(base=_base(), tar=tar(sym("etc", ESCAPE), reg("etc/passwd", "pwned"),
                                      reg("keep/f", "top")),
                expect=CONTAINED,
                check=all_of(at(is_file, "outside/passwd", "pwned"), at(is_file, "keep/f", "top")))


@case
def symlink_with_xattrs():
    """xattrs on a symlink must go on the link itself, never on what it points at."""
    pax = xattrs(trusted__strata="evil", user__strata="evil", security__strata="evil")
    return dict(tar=tar(sym("s", ESCAPE + "/sentinel", pax=pax),
                        sym("t", ESCAPE + "/d", pax=pax)),
                expect=CONTAINED,
                check=all_of(at(is_link, "s", ESCAPE + "/sentinel"),
                             at(is_link, "t", ESCAPE + "/d")))


@case
def symlink_target_with_nul():
    return dict(tar=tar(sym("s", "x", pax={"linkpath": "ok\0" + ESCAPE})), expect=REFUSED)


@case
def symlink_target_longer_than_path_max():
    return dict(tar=tar(sym("s", "/".join(["t" * 200] * 25))), expect=REFUSED)


# hardlinks ----------------------------------------------------------------------------------
@case
def hardlink_to_absolute_outside_path():
    return dict(tar=tar(hard("h", "/etc/passwd")), expect=REFUSED)


@case
def hardlink_to_absolute_inside_path():
    return dict(tar=tar(reg("etc/passwd", "p"), hard("h", "/etc/passwd"),
                        hard("h2", "/../../etc/passwd")),
                expect=CONTAINED,
                check=all_of(at(same_inode, "h", "etc/passwd"), at(same_inode, "h2", "etc/passwd")))


@case
def hardlink_dotdot_to_outside():
    return dict(tar=tar(hard("h", ESCAPE + "/sentinel")), expect=REFUSED)


@case
def hardlink_through_symlinked_parent():
    return dict(tar=tar(sym("l", ESCAPE), hard("h", "l/sentinel")), expect=REFUSED)


@case
def hardlink_through_symlinked_parent_inside():
    return dict(tar=tar(sym("l", "/"), reg("data/f", "x"), hard("h", "l/data/f")),
                expect=CONTAINED, check=at(same_inode, "h", "data/f"))


@case
def hardlink_to_symlink():
    """Links the symlink itself (linkat without AT_SYMLINK_FOLLOW), never its target."""
    return dict(tar=tar(sym("s", ESCAPE + "/sentinel"), hard("h", "s")), expect=CONTAINED,
                check=all_of(at(is_link, "h", ESCAPE + "/sentinel"), at(same_inode, "h", "s")))


@case
def hardlink_to_later_symlink():
    return dict(tar=tar(hard("h", "s"), sym("s", ESCAPE + "/sentinel")), expect=REFUSED)


@case
def hardlink_then_target_replaced_by_symlink():
    return dict(tar=tar(reg("f", "orig"), hard("h", "f"), sym("f", ESCAPE + "/sentinel"),
                        reg("h", "new")),
                expect=CONTAINED,
                check=all_of(at(is_file, "h", "new"), at(is_link, "f", ESCAPE + "/sentinel")))


@case
def hardlink_to_directory():
    return dict(tar=tar(dir_("d"), hard("h", "d")), expect=REFUSED)


@case
def hardlink_to_layer_root():
    return dict(tar=tar(hard("h", "/")), expect=REFUSED)


@case
def hardlink_to_itself():
    return dict(tar=tar(hard("h", "h")), expect=REFUSED)


@case
def hardlink_to_missing_target():
    return dict(tar=tar(reg("a", "a"), hard("h", "nope")), expect=REFUSED)


@case
def hardlink_to_lower_layer_file():
    """A hardlink may only name a file of its own layer: linking a lower layer's inode would
    let this layer change the base (its link count, and through later entries, its data)."""
    return dict(base=_base(), tar=tar(hard("h", "etc/passwd")), expect=REFUSED)


@case
def hardlink_to_whiteout_device():
    return dict(tar=tar(dev("w", tarfile.CHRTYPE, 0, 0), hard("h", "w")), expect=CONTAINED,
                check=all_of(at(is_whiteout, "w"), at(is_whiteout, "h")))


# whiteouts and opaque markers --------------------------------------------------------------
@case
def whiteout_of_dot():
    return dict(tar=tar(reg(".wh..")), expect=REFUSED)


@case
def whiteout_of_dotdot():
    return dict(tar=tar(reg(".wh...")), expect=REFUSED)


@case
def whiteout_of_dotdot_nested():
    return dict(base=_base(), tar=tar(dir_("keep"), reg("keep/.wh...")), expect=REFUSED)


@case
def whiteout_of_root():
    return dict(tar=tar(reg("../../.wh..")), expect=REFUSED)


@case
def whiteout_bare_prefix():
    return dict(tar=tar(reg(".wh.")), expect=REFUSED)


@case
def whiteout_double_prefix():
    return dict(tar=tar(reg(".wh..wh.x")), expect=REFUSED)


@case
def whiteout_via_dotdot():
    return dict(base=_base(), tar=tar(reg("../.wh.x"), reg("keep/../../.wh.keep")),
                expect=CONTAINED,
                check=all_of(at(is_whiteout, "x"), at(is_whiteout, "keep")))


@case
def whiteout_to_the_outside_sentinel():
    return dict(tar=tar(reg(ESCAPE + "/.wh.sentinel")), expect=CONTAINED,
                check=at(is_whiteout, "outside/sentinel"))


@case
def whiteout_through_symlinked_parent():
    return dict(tar=tar(sym("l", ESCAPE), reg("l/.wh.sentinel"), reg("l/.wh.d")),
                expect=CONTAINED,
                check=all_of(at(is_whiteout, "outside/sentinel"), at(is_whiteout, "outside/d")))


@case
def whiteout_replaces_symlink():
    return dict(tar=tar(sym("s", ESCAPE + "/sentinel"), reg(".wh.s")), expect=CONTAINED,
                check=at(is_whiteout, "s"))


@case
def opaque_at_root():
    return dict(tar=tar(reg(".wh..wh..opq"), reg("f", "f")), expect=CONTAINED,
                check=at(xattr_is, "", "trusted.overlay.opaque", b"y"))


@case
def opaque_in_nested_new_dir():
    return dict(tar=tar(reg("a/b/c/.wh..wh..opq")), expect=CONTAINED,
                check=all_of(at(is_dir, "a/b/c"),
                             at(xattr_is, "a/b/c", "trusted.overlay.opaque", b"y"),
                             at(is_absent, "a/b/c/.wh..wh..opq")))


@case
def opaque_through_symlinked_parent():
    return dict(tar=tar(sym("l", ESCAPE + "/d"), reg("l/.wh..wh..opq")), expect=CONTAINED,
                check=at(xattr_is, "outside/d", "trusted.overlay.opaque", b"y"))


# devices, fifos, set-id bits ---------------------------------------------------------------
@case
def block_device():
    return dict(tar=tar(dev("sda", tarfile.BLKTYPE, 8, 0), dev("dev/loop0", tarfile.BLKTYPE, 7, 0)),
                expect=CONTAINED,
                check=all_of(at(is_absent, "sda"), at(is_absent, "dev/loop0")))


@case
def char_devices():
    return dict(tar=tar(dev("dev/mem", tarfile.CHRTYPE, 1, 1), dev("null", tarfile.CHRTYPE, 1, 3),
                        dev("kmsg", tarfile.CHRTYPE, 1, 11, mode=0o4777),
                        dev("zero-major", tarfile.CHRTYPE, 0, 5),
                        dev("wh", tarfile.CHRTYPE, 0, 0, mode=0o6777)),
                expect=CONTAINED,
                check=all_of(at(is_absent, "dev/mem"), at(is_absent, "null"), at(is_absent, "kmsg"),
                             at(is_absent, "zero-major"), at(is_whiteout, "wh")))


@case
def device_through_symlinked_parent():
    return dict(tar=tar(sym("l", ESCAPE), dev("l/sentinel", tarfile.CHRTYPE, 1, 3)),
                expect=CONTAINED, check=at(is_absent, "outside/sentinel"))


@case
def fifo():
    def check(fs: str) -> None:
        if not stat.S_ISFIFO(_lst(fs, "p").st_mode):
            raise AssertionError("p is not a fifo")
    return dict(tar=tar(dev("p", tarfile.FIFOTYPE, 0, 0, mode=0o640)), expect=CONTAINED,
                check=check)


@case
def setuid_setgid_sticky():
    return dict(tar=tar(reg("bin/su", "su", mode=0o4755), reg("bin/sg", "sg", mode=0o2755,
                                                                gid=1000),
                        reg("bin/both", "both", mode=0o6755, uid=1000, gid=1000),
                        dir_("tmp", mode=0o1777), dir_("sgid", mode=0o2775)),
                expect=CONTAINED,
                check=all_of(at(is_file, "bin/su", mode=0o4755), at(is_file, "bin/sg", mode=0o2755),
                             at(is_file, "bin/both", mode=0o6755), at(is_dir, "tmp", 0o1777),
                             at(is_dir, "sgid", 0o2775)))


# long names ---------------------------------------------------------------------------------
_LONG = "/".join(["d" * 90, "e" * 120, "f" * 200])  # 412 characters, each part < NAME_MAX


@case
def pax_long_names():
    return dict(tar=tar(reg(_LONG, "long"), sym("s", "t" * 300), hard("h" * 150, _LONG)),
                expect=CONTAINED,
                check=all_of(at(is_file, _LONG, "long"), at(is_link, "s", "t" * 300),
                             at(same_inode, "h" * 150, _LONG)))


@case
def gnu_long_names():
    return dict(tar=tar(reg(_LONG, "long"), sym("l" * 120, "u" * 300), hard("h" * 150, _LONG),
                        fmt=tarfile.GNU_FORMAT),
                expect=CONTAINED,
                check=all_of(at(is_file, _LONG, "long"), at(is_link, "l" * 120, "u" * 300),
                             at(same_inode, "h" * 150, _LONG)))


@case
def gnu_long_link_name_to_outside():
    return dict(tar=tar(hard("h", "../" * 60 + OUTSIDE + "/sentinel"), fmt=tarfile.GNU_FORMAT),
                expect=REFUSED)


@case
def pax_path_override_outside():
    return dict(tar=tar(reg("benign", "pwned", pax={"path": ESCAPE + "/sentinel"}),
                        reg("benign2", "abs", pax={"path": "/etc/x"})),
                expect=CONTAINED,
                check=all_of(at(is_file, "outside/sentinel", "pwned"), at(is_absent, "benign"),
                             at(is_file, "etc/x", "abs")))


@case
def pax_linkpath_override_outside():
    return dict(tar=tar(reg("benign", "b"),
                        hard("h", "benign", pax={"linkpath": ESCAPE + "/sentinel"})),
                expect=REFUSED)


@case
def pax_global_header_path():
    """A pax global header ('g') naming a path. Python's tarfile applies it to every later
    member (so both land at outside/sentinel, re-rooted); Go's archive/tar and containerd
    ignore it. Whatever is done, nothing may escape."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      pax_headers={"path": ESCAPE + "/sentinel"}) as tf:
        for ti, data in (reg("a", "a"), reg("b", "b")):
            tf.addfile(ti, io.BytesIO(data))
    return dict(tar=buf.getvalue(), expect=CONTAINED)


@case
def name_component_longer_than_name_max():
    return dict(tar=tar(reg("a" * 300, "x")), expect=REFUSED)


# duplicates: the last entry wins ------------------------------------------------------------
@case
def duplicate_file_file():
    return dict(tar=tar(reg("f", "one", mode=0o600), reg("f", "two", mode=0o640)),
                expect=CONTAINED, check=at(is_file, "f", "two", mode=0o640))


@case
def duplicate_file_dir():
    return dict(tar=tar(reg("x", "one"), dir_("x", mode=0o750), reg("x/y", "y")),
                expect=CONTAINED,
                check=all_of(at(is_dir, "x", 0o750), at(is_file, "x/y", "y")))


@case
def duplicate_dir_file():
    return dict(tar=tar(dir_("x"), reg("x/y", "y"), reg("x", "file")), expect=CONTAINED,
                gzip=True, check=at(is_file, "x", "file"))


@case
def duplicate_symlink_file():
    return dict(tar=tar(sym("x", ESCAPE + "/secret"), reg("x", "mine", mode=0o4755)),
                expect=CONTAINED, check=at(is_file, "x", "mine", mode=0o4755))


@case
def duplicate_dir_modes():
    return dict(tar=tar(dir_("x", mode=0o700), reg("x/f", "f"), dir_("x", mode=0o751)),
                expect=CONTAINED, check=all_of(at(is_dir, "x", 0o751), at(is_file, "x/f", "f")))


@case
def file_then_child_of_file():
    return dict(tar=tar(reg("f", "f"), reg("f/g", "g")), expect=REFUSED)


# sizes, truncation, garbage ----------------------------------------------------------------
@case
def huge_declared_size_truncated():
    ti, data = reg("big", b"0123456789", pax={"size": str(10 << 30)})
    return dict(tar=tar((ti, data)), expect=REFUSED)


@case
def huge_declared_size_truncated_gzip():
    ti, data = reg("big", b"0123456789", pax={"size": str(1 << 40)})
    return dict(tar=tar(reg("first", "x"), (ti, data)), expect=REFUSED, gzip=True)


@case
def negative_size_pax():
    ti, data = reg("neg", b"", pax={"size": "-5"})
    return dict(tar=tar((ti, data), reg("after", "a")), expect=REFUSED)


@case
def negative_size_base256():
    data = tar(reg("neg", b"x" * 1024), reg("after", "a"), fmt=tarfile.USTAR_FORMAT)
    neg = b"\xff" + (256 ** 11 - 1024).to_bytes(11, "big")
    return dict(tar=patch_header(data, header_offsets(data)[0], SIZE, neg), expect=REFUSED)


@case
def garbage_size_first_member():
    data = tar(reg("a", "a" * 10), reg("b", "b"), fmt=tarfile.USTAR_FORMAT)
    return dict(tar=patch_header(data, 0, SIZE, b"zz\x01garbage!\0"), expect=REFUSED)


@case
def garbage_size_later_member():
    data = tar(reg("a", "a" * 10), reg("b", "b"), reg("c", "c"), fmt=tarfile.USTAR_FORMAT)
    off = header_offsets(data)[1]
    return dict(tar=patch_header(data, off, SIZE, b"zz\x01garbage!\0"), expect=EITHER,
                why="Python's tarfile treats an invalid header after the first as the end of "
                    "the archive (Go's archive/tar fails with ErrHeader). Both are contained; "
                    "the DiffID still covers every byte of the blob.",
                check=at(is_file, "a", "a" * 10))


@case
def bad_checksum_first_member():
    data = bytearray(tar(reg("a", "a"), fmt=tarfile.USTAR_FORMAT))
    data[148:155] = b"0000000"
    return dict(tar=bytes(data), expect=REFUSED)


@case
def truncated_mid_file():
    payload = random.Random(1).randbytes(5000)
    data = tar(reg("a", "a"), reg("big", payload), fmt=tarfile.USTAR_FORMAT)
    return dict(tar=data[:header_offsets(data)[1] + 512 + 2000], expect=REFUSED)


@case
def truncated_mid_file_gzip():
    payload = random.Random(2).randbytes(5000)
    data = tar(reg("big", payload), fmt=tarfile.USTAR_FORMAT)
    return dict(tar=data[:512 + 3333], expect=REFUSED, gzip=True)


@case
def truncated_mid_header():
    data = tar(reg("a", "a"), reg("b", "b"), fmt=tarfile.USTAR_FORMAT)
    return dict(tar=data[:header_offsets(data)[1] + 200], expect=EITHER,
                why="Python's tarfile ends the archive at a truncated header after the first "
                    "(Go's archive/tar reports io.ErrUnexpectedEOF). Contained either way.",
                check=at(is_file, "a", "a"))


@case
def no_end_of_archive_marker():
    data = strip_end_marker(tar(reg("a", "a"), reg("b", "b"), fmt=tarfile.USTAR_FORMAT))
    return dict(tar=data, expect=CONTAINED,
                check=all_of(at(is_file, "a", "a"), at(is_file, "b", "b")))


@case
def not_a_tar():
    return dict(tar=random.Random(3).randbytes(3000), expect=REFUSED)


@case
def not_a_tar_gzip():
    return dict(tar=b"#!/bin/sh\necho this is not a tar archive\n" * 40, expect=REFUSED,
                gzip=True)


@case
def gzip_media_type_plain_tar():
    """Declared tar+gzip, but the blob is a plain tar: read by its magic bytes, as
    containerd does (some build tools mislabel uncompressed layers); the DiffID and the
    safe unpack apply as for any layer."""
    data = tar(reg("a", "a"))
    return dict(tar=data, blob=data, gzip=True, expect=CONTAINED)


@case
def gzip_truncated_stream():
    data = tar(reg("big", random.Random(4).randbytes(20000)))
    return dict(tar=data, blob=gzip.compress(data, mtime=0)[:6000], gzip=True, expect=REFUSED)


@case
def unknown_entry_type_with_data():
    ti, data = reg("weird", b"w" * 700)
    ti.type = b"Z"
    return dict(tar=tar((ti, data), reg("after", "after")), expect=CONTAINED,
                check=all_of(at(is_absent, "weird"), at(is_file, "after", "after")))


# xattrs -------------------------------------------------------------------------------------
@case
def xattr_overlay_smuggled():
    pax = xattrs(trusted__overlay__redirect="/etc", trusted__overlay__opaque="y",
                 trusted__overlay__metacopy="", trusted__overlay__origin="x",
                 user__fine="ok")
    return dict(tar=tar(dir_("d", pax=pax), reg("f", "f", pax=pax)), expect=CONTAINED,
                check=all_of(*[at(xattr_is, p, "trusted.overlay." + n, None)
                               for p in ("d", "f")
                               for n in ("redirect", "opaque", "metacopy", "origin")],
                             at(xattr_is, "f", "user.fine", b"ok")))


@case
def xattr_name_with_nul():
    return dict(tar=tar(reg("f", "f", pax={"SCHILY.xattr.user.a\0b": "v"})), expect=REFUSED)


# nesting, odd names -------------------------------------------------------------------------
_DEEP = "/".join(["n"] * 200)


@case
def deep_nesting_200():
    return dict(tar=tar(reg(_DEEP + "/leaf", "deep"), sym(_DEEP + "/up", "/".join([".."] * 250)),
                        reg(_DEEP + "/up/top", "top")),
                expect=CONTAINED, gzip=True,
                check=all_of(at(is_file, _DEEP + "/leaf", "deep"), at(is_file, "top", "top")))


@case
def deep_nesting_1200_then_refused():
    """1200 nested dirs (the path stays under PATH_MAX), then an entry that is refused: the
    half-built layer must still be cleaned up."""
    return dict(tar=tar(reg("/".join(["n"] * 1200) + "/leaf", "deep"), hard("h", "missing")),
                expect=REFUSED)


@case
def deep_nesting_1200():
    """Accepted, a tree deeper than Python's recursion limit must still be removable."""
    deep = "/".join(["n"] * 1200)
    return dict(tar=tar(reg(deep + "/leaf", "deep")), expect=CONTAINED,
                check=at(is_file, deep + "/leaf", "deep"))


@case
def name_with_newline():
    return dict(tar=tar(dir_("a\nb"), reg("a\nb/c\n", "nl"), reg("\n", "only")),
                expect=CONTAINED,
                check=all_of(at(is_file, "a\nb/c\n", "nl"), at(is_file, "\n", "only")))


@case
def name_with_nul_in_ustar_field():
    data = tar(reg("placeholder", "nul"), fmt=tarfile.USTAR_FORMAT)
    raw = b"ok\0/../../../outside/sentinel".ljust(100, b"\0")
    return dict(tar=patch_header(data, 0, NAME, raw), expect=CONTAINED,
                check=at(is_file, "ok", "nul"))


@case
def name_with_nul_in_pax_path():
    """pax records may carry a NUL that no path can: it must be refused, not crash."""
    return dict(tar=tar(reg("ok", "ok"), reg("x", "nul", pax={"path": "dir\0evil/file"})),
                expect=REFUSED)


@case
def name_with_nul_then_dotdot_in_pax_path():
    return dict(tar=tar(reg("x", "nul", pax={"path": "a\0" + ESCAPE + "/sentinel"})),
                expect=EITHER,
                why="the component holding the NUL is cancelled by the `..` after it, so no "
                    "NUL reaches a system call (Go's archive/tar refuses any NUL in a pax "
                    "path); accepted, it must land at outside/sentinel in the layer",
                check=at(is_file, "outside/sentinel", "nul"))


@case
def name_not_utf8():
    data = tar(reg("placeholder", "latin1"), fmt=tarfile.USTAR_FORMAT)
    return dict(tar=patch_header(data, 0, NAME, b"caf\xe9\xff".ljust(100, b"\0")),
                expect=CONTAINED, check=at(is_file, os.fsdecode(b"caf\xe9\xff"), "latin1"))


@case
def name_is_bare_whiteout_prefix_dir():
    return dict(tar=tar(dir_(".wh.")), expect=REFUSED)


@case
def root_entries_of_every_type():
    """Entries naming the root itself ('.', '/', '..') as a file, symlink or hardlink."""
    return dict(tar=tar(reg(".", "x"), sym("/", ESCAPE), hard("..", "x"), dir_("./", mode=0o777),
                        reg("after", "a")),
                expect=EITHER,
                why="entries that name the layer root are ignored (a directory only gives the "
                    "root its mtime); refusing them would be as safe",
                check=at(is_file, "after", "a"))
