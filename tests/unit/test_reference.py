"""csi/image/reference.py: the `image` volume attribute, local OCI layout form only."""

import pytest

from csi.errors import InvalidArgument
from csi.image.reference import LayoutReference, is_digest, parse

HEX = "0123456789abcdef" * 4
DIGEST = "sha256:" + HEX


@pytest.mark.parametrize("image, path, tag", [
    ("oci:/abs/path:tag", "/abs/path", "tag"),
    ("oci:/abs/path:v1.2.3-rc_1", "/abs/path", "v1.2.3-rc_1"),
    ("oci:/abs/path", "/abs/path", ""),
    ("oci:/abs/path/", "/abs/path", ""),
    ("oci:/", "/", ""),
    ("oci:/a:b/layout:latest", "/a:b/layout", "latest"),  # ':' in a parent dir is path
    ("oci:/a:b/layout", "/a:b/layout", ""),
    ("oci:/p:" + DIGEST, "/p", DIGEST),
    ("oci:/deep/p/:" + DIGEST, "/deep/p", DIGEST),
    ("oci:/p:" + "x" * 128, "/p", "x" * 128),
    ("oci:/p:_under", "/p", "_under"),
])
def test_valid_layout_references(image, path, tag):
    ref = parse(image)
    assert ref == LayoutReference(path=path, tag=tag)


@pytest.mark.parametrize("image", ["oci:/abs/path:tag", "oci:/abs/path", "oci:/p:" + DIGEST])
def test_str_round_trips(image):
    assert str(parse(image)) == image
    assert parse(str(parse(image))) == parse(image)


@pytest.mark.parametrize("image, fragment", [
    ("oci:/p:", "invalid tag"),
    ("oci:/p:-leading-dash", "invalid tag"),
    ("oci:/p:.dot", "invalid tag"),
    ("oci:/p:" + "x" * 129, "invalid tag"),
    ("oci:/p:bad@char", "invalid tag"),
    ("oci:relative/path:tag", "must be absolute"),
    ("oci:relative", "must be absolute"),
    ("oci:", "must be absolute"),
    ("oci::tag", "must be absolute"),
    ("oci:/a/../etc:tag", "'..'"),
    ("oci:/a/..", "'..'"),
    ("oci:/..", "'..'"),
    ("oci:/a/b/..:tag", "'..'"),
])
def test_invalid_layout_references(image, fragment):
    with pytest.raises(InvalidArgument) as e:
        parse(image)
    assert fragment in str(e.value)
    assert image in str(e.value)  # the message names what was given


def test_malformed_digest_is_not_taken_as_a_digest():
    for bad in ("sha256:" + HEX[:63], "sha256:" + HEX.upper()):
        assert not is_digest(parse(f"oci:/p:{bad}").tag)


def test_dotdot_inside_a_name_is_not_traversal():
    assert parse("oci:/a/..b/c..:t").path == "/a/..b/c.."


def test_empty_image():
    with pytest.raises(InvalidArgument, match="'image' is empty"):
        parse("")


@pytest.mark.parametrize("image", ["oci:/p :tag", " oci:/p", "oci:/p:tag\n", "oci:/p\t",
                                   "oci:/a b"])
def test_whitespace_is_malformed(image):
    with pytest.raises(InvalidArgument, match="malformed"):
        parse(image)


def test_overlong_reference_is_malformed_and_message_is_bounded():
    image = "oci:/" + "a" * 5000
    with pytest.raises(InvalidArgument, match="malformed") as e:
        parse(image)
    assert len(str(e.value)) < 200


@pytest.mark.parametrize("image", ["OCI:/abs/path:tag", "oci-archive:/x.tar"])
def test_unknown_transports_are_refused_helpfully(image):
    with pytest.raises(InvalidArgument) as e:
        parse(image)
    msg = str(e.value)
    assert image in msg
    assert "unknown transport" in msg
    assert "oci:/ABSOLUTE/PATH:TAG" in msg  # tells the user what does work


def test_invalid_argument_maps_to_grpc_code():
    import grpc

    with pytest.raises(InvalidArgument) as e:
        parse("Nginx:1.27")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("s, ok", [
    (DIGEST, True),
    ("sha256:" + HEX.upper(), False),
    ("sha256:" + HEX[:-1], False),
    ("sha256:" + HEX + "0", False),
    ("sha512:" + HEX, False),
    (HEX, False),
    ("", False),
])
def test_is_digest(s, ok):
    assert is_digest(s) is ok
