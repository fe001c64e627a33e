"""csi/image/manifest.py: media types, parsing of index/manifest/config, platform choice."""

import json

import pytest

from csi.errors import InvalidArgument
from csi.image import manifest as mf

D = {c: "sha256:" + c * 64 for c in "0123456789abcdef"}
OCI_TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def dumps(doc) -> bytes:
    return json.dumps(doc).encode()


def desc(digest=D["a"], size=10, media_type=mf.OCI_MANIFEST, **extra) -> dict:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def manifest_doc(layers=None, **over) -> dict:
    doc = {
        "schemaVersion": 2,
        "mediaType": mf.OCI_MANIFEST,
        "config": desc(D["c"], 100, mf.OCI_CONFIG),
        "layers": layers if layers is not None else [
            desc(D["1"], 1000, OCI_TAR_GZ), desc(D["2"], 2000, OCI_TAR_GZ)],
    }
    doc.update(over)
    return doc


# -- index ---------------------------------------------------------------------------------
def test_parse_index_reads_descriptors():
    doc = {"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": [
        desc(D["a"], 11, annotations={"org.opencontainers.image.ref.name": "v1", "x": "y"}),
        desc(D["b"], 22, mf.OCI_INDEX,
             platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
    ]}
    first, second = mf.parse_index(dumps(doc), "idx")
    assert (first.digest, first.size, first.media_type) == (D["a"], 11, mf.OCI_MANIFEST)
    assert first.annotation("org.opencontainers.image.ref.name") == "v1"
    assert first.annotation("missing") == ""
    assert first.platform == ("", "", "")
    assert second.platform == ("linux", "arm64", "v8")
    assert second.media_type == mf.OCI_INDEX


def test_parse_index_empty_manifests_is_an_empty_list():
    assert mf.parse_index(dumps({"schemaVersion": 2, "manifests": []}), "idx") == []


@pytest.mark.parametrize("data, fragment", [
    (b"not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'"string"', "not a JSON object"),
    (dumps({"manifests": []}), "schemaVersion None is not 2"),
    (dumps({"schemaVersion": 1, "manifests": []}), "is not 2"),
    (dumps({"schemaVersion": "2", "manifests": []}), "is not 2"),
    (dumps({"schemaVersion": 2}), "'manifests' is missing"),
    (dumps({"schemaVersion": 2, "manifests": {}}), "'manifests' is missing"),
    (dumps({"schemaVersion": 2, "manifests": ["x"]}), "descriptor is not an object"),
    (dumps({"schemaVersion": 2, "manifests": [desc(digest="sha256:abc")]}), "malformed digest"),
])
def test_parse_index_refuses(data, fragment):
    with pytest.raises(InvalidArgument) as e:
        mf.parse_index(data, "my-index")
    assert fragment in str(e.value)
    assert "my-index" in str(e.value)


# -- descriptors ---------------------------------------------------------------------------
@pytest.mark.parametrize("digest", [
    None, 5, "", "sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha512:" + "a" * 128,
    "md5:d41d8cd98f00b204e9800998ecf8427e", "sha256:../../../etc/passwd" + "a" * 40,
])
def test_descriptor_malformed_digest(digest):
    with pytest.raises(InvalidArgument, match="malformed digest"):
        mf.descriptor({"digest": digest, "size": 1}, "w")


@pytest.mark.parametrize("size", [None, -1, "10", 1.5])
def test_descriptor_invalid_size(size):
    with pytest.raises(InvalidArgument, match="invalid size"):
        mf.descriptor({"digest": D["a"], "size": size}, "w")


def test_descriptor_annotations_are_sorted_and_hashable():
    d = mf.descriptor(desc(annotations={"b": "2", "a": "1"}), "w")
    assert d.annotations == (("a", "1"), ("b", "2"))
    hash(d)


@pytest.mark.parametrize("extra", [{"annotations": ["x"]}, {"platform": "linux/amd64"}])
def test_descriptor_non_object_fields_are_invalid_argument(extra):
    with pytest.raises(InvalidArgument):
        mf.descriptor(desc(**extra), "w")


# -- manifest ------------------------------------------------------------------------------
def test_parse_manifest_good():
    config, layers = mf.parse_manifest(dumps(manifest_doc()), "m")
    assert (config.digest, config.size, config.media_type) == (D["c"], 100, mf.OCI_CONFIG)
    assert [(d.digest, d.size) for d in layers] == [(D["1"], 1000), (D["2"], 2000)]  # base first


def test_parse_manifest_media_type_defaults_to_oci():
    doc = manifest_doc()
    del doc["mediaType"]
    _, layers = mf.parse_manifest(dumps(doc), "m")
    assert len(layers) == 2


def test_parse_docker_schema2_manifest():
    gz = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    doc = manifest_doc(mediaType=mf.DOCKER_MANIFEST, config=desc(D["c"], 5, mf.DOCKER_CONFIG),
                       layers=[desc(D["1"], 1, gz)])
    config, [layer] = mf.parse_manifest(dumps(doc), "m")
    assert config.media_type == mf.DOCKER_CONFIG
    assert layer.media_type == gz


@pytest.mark.parametrize("media_type, compression", sorted(mf.LAYER_TYPES.items()))
def test_every_known_layer_type_is_accepted(media_type, compression):
    _, [layer] = mf.parse_manifest(dumps(manifest_doc([desc(D["1"], 1, media_type)])), "m")
    ld = mf.LayerDesc(layer.digest, layer.media_type, layer.size, D["9"])
    assert ld.compression == compression


def test_layer_compression_names():
    assert mf.LayerDesc(D["1"], "application/vnd.oci.image.layer.v1.tar", 1, D["2"]) \
        .compression == "none"
    assert mf.LayerDesc(D["1"], OCI_TAR_GZ, 1, D["2"]).compression == "gzip"
    assert mf.LayerDesc(D["1"], "application/vnd.oci.image.layer.v1.tar+zstd", 1, D["2"]) \
        .compression == "zstd"


def test_schema1_manifest_is_refused():
    schema1 = {"schemaVersion": 1, "name": "library/nginx", "tag": "1.0",
               "fsLayers": [{"blobSum": D["1"]}], "history": []}
    with pytest.raises(InvalidArgument) as e:
        mf.parse_manifest(dumps(schema1), "nginx manifest")
    assert "schema 1 manifests are not supported" in str(e.value)
    assert "nginx manifest" in str(e.value)


@pytest.mark.parametrize("doc", [
    {"schemaVersion": 2, "mediaType": mf.OCI_INDEX, "manifests": []},
    {"schemaVersion": 2, "mediaType": mf.DOCKER_LIST, "manifests": []},
    {"schemaVersion": 2, "manifests": []},  # no mediaType, but shaped like an index
])
def test_index_given_as_manifest_is_refused(doc):
    with pytest.raises(InvalidArgument, match="is an index, not a manifest"):
        mf.parse_manifest(dumps(doc), "m")


def test_unknown_manifest_media_type():
    doc = manifest_doc(mediaType="application/vnd.example.thing+json")
    with pytest.raises(InvalidArgument, match="unsupported manifest media type"):
        mf.parse_manifest(dumps(doc), "m")


@pytest.mark.parametrize("media_type", [
    "application/vnd.oci.image.layer.v1.tar+bzip2",
    "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
    "",
])
def test_unknown_layer_media_type(media_type):
    layers = [desc(D["1"], 1, OCI_TAR_GZ), desc(D["2"], 1, media_type)]
    with pytest.raises(InvalidArgument) as e:
        mf.parse_manifest(dumps(manifest_doc(layers)), "m")
    assert "unsupported media type" in str(e.value)
    assert D["2"] in str(e.value)  # names the offending layer


@pytest.mark.parametrize("layers", [[], None, "abc", {}])
def test_manifest_without_layers(layers):
    doc = manifest_doc()
    doc["layers"] = layers
    with pytest.raises(InvalidArgument, match="lists no layers"):
        mf.parse_manifest(dumps(doc), "m")


@pytest.mark.parametrize("config", [None, "x", {"digest": "sha256:short", "size": 1}])
def test_manifest_bad_config_descriptor(config):
    with pytest.raises(InvalidArgument):
        mf.parse_manifest(dumps(manifest_doc(config=config)), "m")


def test_manifest_malformed_layer_digest():
    layers = [desc("sha256:" + "z" * 64, 1, OCI_TAR_GZ)]
    with pytest.raises(InvalidArgument, match="malformed digest"):
        mf.parse_manifest(dumps(manifest_doc(layers)), "m")


def test_manifest_not_json():
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        mf.parse_manifest(b"{", "m")


# -- config --------------------------------------------------------------------------------
def test_parse_config_diff_ids():
    cfg = {"architecture": "amd64", "os": "linux",
           "rootfs": {"type": "layers", "diff_ids": [D["1"], D["2"]]}}
    assert mf.parse_config_diff_ids(dumps(cfg), "cfg") == [D["1"], D["2"]]


@pytest.mark.parametrize("cfg, fragment", [
    ({}, "no rootfs.diff_ids"),
    ({"rootfs": {}}, "no rootfs.diff_ids"),
    ({"rootfs": {"type": "layers"}}, "no rootfs.diff_ids"),
    ({"rootfs": {"diff_ids": [D["1"]]}}, "no rootfs.diff_ids"),  # type missing
    ({"rootfs": {"type": "snapshot", "diff_ids": [D["1"]]}}, "no rootfs.diff_ids"),
    ({"rootfs": {"type": "layers", "diff_ids": D["1"]}}, "no rootfs.diff_ids"),
    ({"rootfs": {"type": "layers", "diff_ids": [D["1"], "sha256:xyz"]}}, "malformed diff_id"),
    ({"rootfs": {"type": "layers", "diff_ids": [7]}}, "malformed diff_id"),
])
def test_parse_config_refuses(cfg, fragment):
    with pytest.raises(InvalidArgument) as e:
        mf.parse_config_diff_ids(dumps(cfg), "the-config")
    assert fragment in str(e.value)
    assert "the-config" in str(e.value)


def test_parse_config_not_json():
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        mf.parse_config_diff_ids(b"\x00garbage", "cfg")


@pytest.mark.parametrize("rootfs", ["layers", ["layers"]])
def test_parse_config_non_object_rootfs(rootfs):
    with pytest.raises(InvalidArgument):
        mf.parse_config_diff_ids(dumps({"rootfs": rootfs}), "cfg")


# -- platforms -----------------------------------------------------------------------------
def entry(digest, os_="linux", arch="amd64", variant=""):
    return mf.Descriptor(mf.OCI_MANIFEST, digest, 1, platform=(os_, arch, variant))


def best(entries, want=None) -> str:
    """The digest of the entry the node tries first."""
    return mf.platform_candidates(entries, want)[0].digest


def test_select_exact_arch():
    entries = [entry(D["1"], arch="arm64", variant="v8"), entry(D["2"], arch="amd64"),
               entry(D["3"], arch="s390x")]
    assert best(entries, ("linux", "amd64", "")) == D["2"]
    assert best(entries, ("linux", "s390x", "")) == D["3"]


def test_select_os_must_match():
    entries = [entry(D["1"], os_="windows", arch="amd64"), entry(D["2"], os_="linux")]
    assert best(entries, ("linux", "amd64", "")) == D["2"]


def test_select_variant_prefers_the_node_variant():
    entries = [entry(D["1"], arch="arm", variant="v6"), entry(D["2"], arch="arm", variant="v7")]
    assert best(entries, ("linux", "arm", "v7")) == D["2"]
    assert best(entries, ("linux", "arm", "v6")) == D["1"]


def test_select_entry_without_variant_matches_any_variant():
    entries = [entry(D["1"], arch="arm64")]
    assert best(entries, ("linux", "arm64", "v8")) == D["1"]


def test_select_first_of_equals_wins():
    entries = [entry(D["1"]), entry(D["2"])]
    assert best(entries, ("linux", "amd64", "")) == D["1"]


@pytest.mark.parametrize("want", [("linux", "riscv64", ""), ("linux", "arm", "v7"),
                                  ("freebsd", "amd64", "")])
def test_select_none_matches(want):
    entries = [entry(D["1"], arch="amd64"), entry(D["2"], arch="arm64", variant="v8")]
    assert mf.platform_candidates(entries, want) == []
    assert mf.platform_candidates([], want) == []


@pytest.mark.parametrize("want, shown", [
    (("linux", "riscv64", ""), "linux/riscv64"),
    (("linux", "arm", "v7"), "linux/arm/v7"),
    (("freebsd", "amd64", ""), "freebsd/amd64"),
])
def test_no_platform_names_the_image_and_the_node_platform(want, shown):
    e = mf.no_platform("oci:/x:y", want)
    assert isinstance(e, InvalidArgument)
    assert f"oci:/x:y has no manifest for platform {shown}" in str(e)


def test_select_defaults_to_node_platform():
    os_, arch, variant = mf.node_platform()
    entries = [entry(D["1"], arch="not-this-one"), entry(D["2"], os_, arch, variant)]
    assert best(entries) == D["2"]


def test_node_platform_shape():
    os_, arch, variant = mf.node_platform()
    assert os_ == "linux"
    assert arch and arch == arch.lower()
    assert arch not in ("x86_64", "aarch64")  # GOARCH names, not uname names
    assert variant in ("", "v7", "v8")


@pytest.mark.parametrize("machine, expected", [
    ("x86_64", ("linux", "amd64", "")),
    ("aarch64", ("linux", "arm64", "v8")),
    ("armv7l", ("linux", "arm", "v7")),
    ("ppc64le", ("linux", "ppc64le", "")),
    ("S390X", ("linux", "s390x", "")),
    ("mips64", ("linux", "mips64", "")),
])
def test_node_platform_mapping(monkeypatch, machine, expected):
    monkeypatch.setattr(mf.platform, "machine", lambda: machine)
    assert mf.node_platform() == expected


def unlabelled(digest):
    return mf.Descriptor(mf.OCI_MANIFEST, digest, 1)


def test_an_entry_without_platform_is_taken_when_nothing_names_the_node():
    entries = [entry(D["1"], arch="arm64"), unlabelled(D["2"])]
    assert best(entries, ("linux", "amd64", "")) == D["2"]
    assert best([unlabelled(D["3"])], ("linux", "s390x", "")) == D["3"]


def test_candidates_rank_exact_then_other_variant_then_unlabelled():
    entries = [unlabelled(D["1"]), entry(D["2"], arch="arm", variant="v6"),
               entry(D["3"], arch="amd64"), entry(D["4"], arch="arm", variant="v7"),
               entry(D["5"], os_="windows", arch="arm", variant="v7"), unlabelled(D["6"])]
    ranked = mf.platform_candidates(entries, ("linux", "arm", "v7"))
    assert [e.digest for e in ranked] == [D["4"], D["2"], D["1"], D["6"]]
    assert mf.platform_candidates(entries[2:5], ("linux", "riscv64", "")) == []


def test_an_entry_with_only_some_platform_fields_is_not_unlabelled():
    partial = mf.Descriptor(mf.OCI_MANIFEST, D["1"], 1, platform=("", "amd64", ""))
    assert mf.platform_candidates([partial], ("linux", "amd64", "")) == []


def test_the_config_says_which_platform_an_unlabelled_entry_is_for():
    config = dumps({"os": "linux", "architecture": "arm64", "variant": "v8", "rootfs": {}})
    assert mf.config_platform(config, "cfg") == ("linux", "arm64", "v8")
    assert mf.runs_on(("linux", "arm64", ""), ("linux", "arm64", "v8"))
    assert not mf.runs_on(("linux", "arm64", "v8"), ("linux", "amd64", ""))
    assert not mf.runs_on(("", "", ""), ("linux", "amd64", ""))  # says nothing: not ours
