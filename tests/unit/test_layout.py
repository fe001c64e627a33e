"""csi/image/layout.py: resolving images in a local OCI layout written by csi/image/build.py,
and streaming layer blobs through digest verification."""

import dataclasses
import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest

from csi.digest import VerifyingReader
from csi.errors import DataLoss, InvalidArgument, NotFound
from csi.image import manifest as mf
from csi.image.build import LayerBuilder, write_image
from csi.image.layout import REF_NAME, OciLayout
from csi.image.reference import LayoutReference, parse


def base() -> LayerBuilder:
    return LayerBuilder().dir("etc").file("etc/motd", "base\n").file("bin/sh", "#!", mode=0o755)


def top() -> LayerBuilder:
    return LayerBuilder().file("etc/motd", "top\n").whiteout("bin/sh")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(layout, digest: str) -> str:
    return os.path.join(str(layout), "blobs", "sha256", digest.partition(":")[2])


def read_blob(layout, digest: str) -> bytes:
    with open(blob_path(layout, digest), "rb") as f:
        return f.read()


def put_blob(layout, data: bytes) -> tuple[str, int]:
    digest = sha(data)
    with open(blob_path(layout, digest), "wb") as f:
        f.write(data)
    return digest, len(data)


def read_index(layout) -> dict:
    with open(os.path.join(str(layout), "index.json")) as f:
        return json.load(f)


def write_index(layout, index: dict) -> None:
    with open(os.path.join(str(layout), "index.json"), "w") as f:
        json.dump(index, f)


def resolve(layout, tag: str = ""):
    return OciLayout(LayoutReference(str(layout), tag)).resolve()


@pytest.fixture
def layout(tmp_path):
    path = tmp_path / "layout"
    digest = write_image(str(path), "app", [base(), top()])
    return path, digest


def test_resolve_by_tag(layout):
    path, mdigest = layout
    img = resolve(path, "app")
    assert img.manifest_digest == mdigest
    assert img.name == f"oci:{path}:app"
    diff_ids = [sha(base().tar_bytes()), sha(top().tar_bytes())]
    assert [ld.diff_id for ld in img.layers] == diff_ids  # base first
    for ld in img.layers:
        blob = read_blob(path, ld.digest)
        assert ld.size == len(blob)
        assert ld.compression == "gzip"
        assert sha(gzip.decompress(blob)) == ld.diff_id
    manifest = json.loads(read_blob(path, mdigest))
    assert img.config_digest == manifest["config"]["digest"]


def test_resolve_through_the_reference_parser(layout):
    path, mdigest = layout
    assert OciLayout(parse(f"oci:{path}:app")).resolve().manifest_digest == mdigest


def test_resolve_by_digest(layout):
    path, mdigest = layout
    other = write_image(str(path), "other", [base()])
    assert resolve(path, mdigest).manifest_digest == mdigest
    assert resolve(path, other).manifest_digest == other
    assert len(resolve(path, other).layers) == 1


def test_resolve_without_tag_when_single_image(layout):
    path, mdigest = layout
    assert resolve(path).manifest_digest == mdigest


def test_resolve_without_tag_when_several_images(layout):
    path, _ = layout
    write_image(str(path), "other", [base()])
    with pytest.raises(InvalidArgument, match="holds 2 images"):
        resolve(path)


def test_retagging_replaces_the_entry(layout):
    path, first = layout
    second = write_image(str(path), "app", [base()])
    assert second != first
    assert resolve(path, "app").manifest_digest == second
    assert len(read_index(path)["manifests"]) == 1


def count_blob_reads(monkeypatch) -> list[str]:
    reads = []
    real = OciLayout._read_json_blob

    def counted(self, desc, what):
        reads.append(what)
        return real(self, desc, what)

    monkeypatch.setattr(OciLayout, "_read_json_blob", counted)
    return reads


def test_a_warm_resolve_reads_no_blob_again(layout, monkeypatch):
    path, mdigest = layout
    reads = count_blob_reads(monkeypatch)
    first = resolve(path, "app")
    assert reads == ["manifest", "config"]
    assert resolve(path, "app") == first and reads == ["manifest", "config"]
    assert resolve(path, mdigest).manifest_digest == mdigest  # another reference: read
    assert reads == ["manifest", "config"] * 2


def test_a_moved_tag_is_seen_at_the_next_resolve(layout, monkeypatch):
    path, first = layout
    assert resolve(path, "app").manifest_digest == first
    second = write_image(str(path), "app", [base()])
    reads = count_blob_reads(monkeypatch)
    img = resolve(path, "app")
    assert img.manifest_digest == second and len(img.layers) == 1
    assert reads == ["manifest", "config"]


def tamper_config(path, mdigest) -> tuple[str, bytes]:
    """Change the image's config blob in place (its digest no longer matches): (the blob's
    path, its bytes before)."""
    cdigest = json.loads(read_blob(path, mdigest))["config"]["digest"]
    data = read_blob(path, cdigest)
    with open(blob_path(path, cdigest), "wb") as f:
        f.write(data.replace(b"linux", b"LINUX"))
    return blob_path(path, cdigest), data


def test_a_failed_resolve_is_not_remembered(layout):
    path, mdigest = layout
    blob, good = tamper_config(path, mdigest)
    with pytest.raises(InvalidArgument, match="does not match its digest"):
        resolve(path, "app")
    with open(blob, "wb") as f:
        f.write(good)
    assert resolve(path, "app").manifest_digest == mdigest


def test_remembered_images_are_bounded_least_recently_used_first():
    from csi.image.layout import _Resolved

    memo = _Resolved(size=2)
    images = {k: mf.Image(k, "sha256:" + k * 64, "sha256:" + "c" * 64, ()) for k in "abc"}
    memo.put(("a",), images["a"])
    memo.put(("b",), images["b"])
    assert memo.get(("a",)) is images["a"]  # now b is the least recently used
    memo.put(("c",), images["c"])
    assert memo.get(("b",)) is None
    assert memo.get(("a",)) is images["a"] and memo.get(("c",)) is images["c"]


def test_uncompressed_layers(tmp_path):
    write_image(str(tmp_path / "l"), "plain", [base()], compression="none")
    [ld] = resolve(tmp_path / "l", "plain").layers
    assert ld.compression == "none"
    assert ld.digest == ld.diff_id  # the blob is the tar itself


def test_unknown_tag_is_not_found(layout):
    path, _ = layout
    with pytest.raises(NotFound, match="tag 'nope' not found"):
        resolve(path, "nope")


def test_unknown_digest_is_not_found(layout):
    path, _ = layout
    with pytest.raises(NotFound):
        resolve(path, "sha256:" + "0" * 64)


def test_missing_layout_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="no OCI image layout"):
        resolve(tmp_path / "absent", "app")


def test_missing_index_is_not_found(layout):
    path, _ = layout
    os.unlink(path / "index.json")
    with pytest.raises(NotFound, match="index.json is missing"):
        resolve(path, "app")


@pytest.mark.parametrize("content, fragment", [
    ("{", "malformed"),
    ("[]", "malformed"),
    ('{"imageLayoutVersion": "2.0.0"}', "unsupported imageLayoutVersion"),
    ("{}", "unsupported imageLayoutVersion"),
])
def test_bad_oci_layout_file(layout, content, fragment):
    path, _ = layout
    (path / "oci-layout").write_text(content)
    with pytest.raises(InvalidArgument, match=fragment):
        resolve(path, "app")


def test_corrupt_index_json(layout):
    path, _ = layout
    (path / "index.json").write_text('{"schemaVersion": 2, "manifests": [')
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        resolve(path, "app")


def test_manifest_blob_tampered(layout):
    path, mdigest = layout
    p = blob_path(path, mdigest)
    data = bytearray(read_blob(path, mdigest))
    data[data.index(b"layers")] = ord("L")  # same size, different content
    with open(p, "wb") as f:
        f.write(data)
    with pytest.raises(InvalidArgument, match="does not match its digest"):
        resolve(path, "app")


def test_manifest_blob_size_differs_from_descriptor(layout):
    path, mdigest = layout
    index = read_index(path)
    index["manifests"][0]["size"] += 1
    write_index(path, index)
    with pytest.raises(InvalidArgument, match="does not match"):
        resolve(path, "app")


def test_manifest_blob_missing(layout):
    path, mdigest = layout
    os.unlink(blob_path(path, mdigest))
    with pytest.raises(NotFound, match="is missing"):
        resolve(path, "app")


def test_config_blob_tampered(layout):
    path, mdigest = layout
    tamper_config(path, mdigest)
    with pytest.raises(InvalidArgument, match="config .* does not match its digest"):
        resolve(path, "app")


def test_oversized_descriptor_is_refused_before_reading(layout):
    path, _ = layout
    index = read_index(path)
    index["manifests"][0]["size"] = mf.MAX_MANIFEST_BYTES + 1
    write_index(path, index)
    with pytest.raises(InvalidArgument, match="too large"):
        resolve(path, "app")


def reseal(path, drop_diff_ids: int = 0, drop_layers: int = 0) -> str:
    """Rewrite the 'app' image's config and manifest (with valid digests) so that the
    manifest's layers and the config's diff_ids disagree in number."""
    index = read_index(path)
    mdigest = index["manifests"][0]["digest"]
    manifest = json.loads(read_blob(path, mdigest))
    config = json.loads(read_blob(path, manifest["config"]["digest"]))
    if drop_diff_ids:
        config["rootfs"]["diff_ids"] = config["rootfs"]["diff_ids"][:-drop_diff_ids]
    if drop_layers:
        manifest["layers"] = manifest["layers"][:-drop_layers]
    cd, cs = put_blob(path, json.dumps(config).encode())
    manifest["config"].update(digest=cd, size=cs)
    md, ms = put_blob(path, json.dumps(manifest).encode())
    index["manifests"][0].update(digest=md, size=ms)
    write_index(path, index)
    return md


@pytest.mark.parametrize("drop_diff_ids, drop_layers, layers, diff_ids", [(1, 0, 2, 1),
                                                                          (0, 1, 1, 2)])
def test_layer_count_differs_from_diff_ids(layout, drop_diff_ids, drop_layers, layers,
                                           diff_ids):
    path, _ = layout
    reseal(path, drop_diff_ids=drop_diff_ids, drop_layers=drop_layers)
    with pytest.raises(InvalidArgument) as e:
        resolve(path, "app")
    assert f"has {layers} layers but the config lists {diff_ids} diff_ids" in str(e.value)


def test_reseal_without_changes_still_resolves(layout):
    # Guards the helper above: a resealed but consistent image is fine.
    path, _ = layout
    md = reseal(path)
    assert resolve(path, "app").manifest_digest == md


def test_nested_index_selects_node_platform(layout):
    path, mdigest = layout
    os_, arch, variant = mf.node_platform()
    msize = os.path.getsize(blob_path(path, mdigest))
    decoy = {"mediaType": mf.OCI_MANIFEST, "digest": "sha256:" + "e" * 64, "size": 1,
             "platform": {"os": "linux", "architecture": "not-" + arch}}
    child = {"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": [
        decoy,
        {"mediaType": mf.OCI_MANIFEST, "digest": mdigest, "size": msize,
         "platform": {"os": os_, "architecture": arch, "variant": variant}},
    ]}
    cd, cs = put_blob(path, json.dumps(child).encode())
    write_index(path, {"schemaVersion": 2, "manifests": [
        {"mediaType": mf.OCI_INDEX, "digest": cd, "size": cs, "annotations": {REF_NAME: "multi"}},
    ]})
    assert resolve(path, "multi").manifest_digest == mdigest


def test_nested_index_without_node_platform(layout):
    path, mdigest = layout
    child = {"schemaVersion": 2, "manifests": [
        {"mediaType": mf.OCI_MANIFEST, "digest": mdigest, "size": 1,
         "platform": {"os": "plan9", "architecture": "mips"}}]}
    cd, cs = put_blob(path, json.dumps(child).encode())
    write_index(path, {"schemaVersion": 2, "manifests": [
        {"mediaType": mf.OCI_INDEX, "digest": cd, "size": cs, "annotations": {REF_NAME: "m"}}]})
    with pytest.raises(InvalidArgument, match="has no manifest for platform"):
        resolve(path, "m")


def node_platform_dict() -> dict:
    os_, arch, variant = mf.node_platform()
    return {"os": os_, "architecture": arch, **({"variant": variant} if variant else {})}


def index_of(path, *entries, tag: str = "multi") -> None:
    """index.json naming, as `tag`, an index blob that lists `entries`."""
    cd, cs = put_blob(path, json.dumps({"schemaVersion": 2, "mediaType": mf.OCI_INDEX,
                                        "manifests": list(entries)}).encode())
    write_index(path, {"schemaVersion": 2, "manifests": [
        {"mediaType": mf.OCI_INDEX, "digest": cd, "size": cs, "annotations": {REF_NAME: tag}}]})


def manifest_entry(path, digest: str, platform: dict | None = None) -> dict:
    return {"mediaType": mf.OCI_MANIFEST, "digest": digest,
            "size": os.path.getsize(blob_path(path, digest)),
            **({"platform": platform} if platform else {})}


def foreign_copy(path, mdigest: str) -> str:
    """The image at `mdigest` again, its config saying another architecture."""
    manifest = json.loads(read_blob(path, mdigest))
    config = json.loads(read_blob(path, manifest["config"]["digest"]))
    config["architecture"] = "arm64" if mf.node_platform()[1] != "arm64" else "amd64"
    cd, cs = put_blob(path, json.dumps(config).encode())
    manifest["config"].update(digest=cd, size=cs)
    return put_blob(path, json.dumps(manifest).encode())[0]


# The layout narrows an index as a registry does (manifest.resolve serves both).
def test_an_unlabelled_entry_whose_config_is_for_another_architecture_is_skipped(layout):
    path, mdigest = layout
    foreign = foreign_copy(path, mdigest)
    index_of(path, manifest_entry(path, foreign), manifest_entry(path, mdigest))
    assert resolve(path, "multi").manifest_digest == mdigest
    index_of(path, manifest_entry(path, foreign))
    with pytest.raises(InvalidArgument, match="has no manifest for platform"):
        resolve(path, "multi")


def test_index_entries_are_tried_best_first_until_one_runs_on_the_node(layout):
    """The entry naming the node's platform leads to an index with nothing for the node:
    the next candidate, which names no platform, is taken."""
    path, mdigest = layout
    empty = {"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": [
        {**manifest_entry(path, mdigest), "platform": {"os": "plan9", "architecture": "mips"}}]}
    ed, es = put_blob(path, json.dumps(empty).encode())
    index_of(path, {"mediaType": mf.OCI_INDEX, "digest": ed, "size": es,
                    "platform": node_platform_dict()},
             manifest_entry(path, mdigest))
    assert resolve(path, "multi").manifest_digest == mdigest


@pytest.mark.parametrize("depth, ok", [(4, True), (5, False)])
def test_indexes_nested_more_than_4_deep_are_invalid_argument(layout, depth, ok):
    path, mdigest = layout
    entry = manifest_entry(path, mdigest, node_platform_dict())
    for _ in range(depth):
        d, size = put_blob(path, json.dumps({"schemaVersion": 2, "mediaType": mf.OCI_INDEX,
                                             "manifests": [entry]}).encode())
        entry = {"mediaType": mf.OCI_INDEX, "digest": d, "size": size,
                 "platform": node_platform_dict()}
    write_index(path, {"schemaVersion": 2, "manifests": [
        {**entry, "annotations": {REF_NAME: "deep"}}]})
    if ok:
        assert resolve(path, "deep").manifest_digest == mdigest
    else:
        with pytest.raises(InvalidArgument, match="nested more than 4 deep"):
            resolve(path, "deep")


# -- layer blobs ---------------------------------------------------------------------------
def test_open_blob_reads_verified_layer(layout):
    path, _ = layout
    img = resolve(path, "app")
    src = OciLayout(LayoutReference(str(path), "app"))
    for ld in img.layers:
        with src.open_blob(ld) as r:
            assert isinstance(r, VerifyingReader)
            data = r.read()
            assert r.read() == b""  # EOF: verified here
            assert r.verified
        assert sha(data) == ld.digest


def test_open_blob_through_gzip_and_tarfile(layout):
    path, _ = layout
    ld = resolve(path, "app").layers[0]
    with OciLayout(LayoutReference(str(path), "app")).open_blob(ld) as r:
        with tarfile.open(fileobj=gzip.GzipFile(fileobj=r), mode="r|") as tf:
            names = [m.name for m in tf]
        r.drain()
        assert r.verified
    assert names == ["etc", "etc/motd", "bin/sh"]


def flip_middle_byte(p: str) -> None:
    with open(p, "r+b") as f:
        f.seek(os.path.getsize(p) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_layer_blob_raises_data_loss_at_the_end(layout):
    path, _ = layout
    ld = resolve(path, "app").layers[0]  # resolving does not read layer blobs
    flip_middle_byte(blob_path(path, ld.digest))
    with OciLayout(LayoutReference(str(path), "app")).open_blob(ld) as r:
        first = r.read(10)
        assert len(first) == 10  # no error before the end: the digest is known only then
        with pytest.raises(DataLoss, match="digest mismatch"):
            r.drain()
        assert not r.verified


def test_layer_blob_longer_than_declared_raises_data_loss(layout):
    path, _ = layout
    ld = resolve(path, "app").layers[0]
    short = dataclasses.replace(ld, size=ld.size - 5)
    with OciLayout(LayoutReference(str(path), "app")).open_blob(short) as r:
        with pytest.raises(DataLoss, match="more than the"):
            r.read()


def test_layer_blob_shorter_than_declared_raises_data_loss(layout):
    path, _ = layout
    ld = resolve(path, "app").layers[0]
    longer = dataclasses.replace(ld, size=ld.size + 5)
    with OciLayout(LayoutReference(str(path), "app")).open_blob(longer) as r:
        with pytest.raises(DataLoss, match="does not match the declared"):
            r.drain()


def test_layer_blob_missing(layout):
    path, _ = layout
    ld = resolve(path, "app").layers[1]
    os.unlink(blob_path(path, ld.digest))
    with pytest.raises(NotFound, match="layer blob"):
        OciLayout(LayoutReference(str(path), "app")).open_blob(ld)


# -- VerifyingReader directly --------------------------------------------------------------
def test_verifying_reader_chunked_reads_and_readinto():
    data = os.urandom(10_000)
    r = VerifyingReader(io.BytesIO(data), sha(data), len(data), "blob")
    buf = bytearray(4096)
    got = b""
    while n := r.readinto(buf):
        got += bytes(buf[:n])
    assert got == data and r.verified and r.bytes_read == len(data)


def test_verifying_reader_unknown_size_checks_digest_only():
    data = b"hello"
    r = VerifyingReader(io.BytesIO(data), sha(data), None, "blob")
    r.drain()
    assert r.verified
    bad = VerifyingReader(io.BytesIO(data + b"!"), sha(data), None, "blob")
    with pytest.raises(DataLoss):
        bad.drain()


def test_verifying_reader_zero_read_does_not_verify():
    data = b"abc"
    r = VerifyingReader(io.BytesIO(data), sha(b"other"), 3, "blob")
    assert r.read(0) == b""  # not EOF: must not raise, must not mark verified
    assert not r.verified
