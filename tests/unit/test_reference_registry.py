"""csi/image/reference.py: registry references, normalised as distribution/reference does.

Cases marked "distribution" are taken from the behaviour documented by
github.com/distribution/reference's normalize_test.go and reference_test.go.
"""

import random
import re

import grpc
import pytest

from csi.errors import InvalidArgument
from csi.image.reference import LayoutReference, RegistryReference, is_digest, parse

HEX = "0123456789abcdef" * 4
DIGEST = "sha256:" + HEX
FF = "sha256:" + "f" * 64


@pytest.mark.parametrize("image, registry, repository, tag, digest", [
    ("nginx", "docker.io", "library/nginx", "latest", ""),
    ("library/nginx", "docker.io", "library/nginx", "latest", ""),
    ("docker.io/nginx", "docker.io", "library/nginx", "latest", ""),
    ("docker.io/library/nginx", "docker.io", "library/nginx", "latest", ""),
    ("index.docker.io/library/nginx:1", "docker.io", "library/nginx", "1", ""),
    ("index.docker.io/nginx", "docker.io", "library/nginx", "latest", ""),
    ("nginx:1.27", "docker.io", "library/nginx", "1.27", ""),
    ("nginx@" + DIGEST, "docker.io", "library/nginx", "", DIGEST),
    ("nginx:1.27@" + DIGEST, "docker.io", "library/nginx", "1.27", DIGEST),
    ("user/app", "docker.io", "user/app", "latest", ""),
    ("library/foo/bar", "docker.io", "library/foo/bar", "latest", ""),
    ("localhost/app", "localhost", "app", "latest", ""),
    ("localhost:5000/app:v1", "localhost:5000", "app", "v1", ""),
    ("127.0.0.1:5000/team/app@" + DIGEST, "127.0.0.1:5000", "team/app", "", DIGEST),
    ("registry.example:5000/team/app:tag@" + DIGEST,
     "registry.example:5000", "team/app", "tag", DIGEST),
    ("[::1]:5000/app", "[::1]:5000", "app", "latest", ""),
    ("[fe80::1]/x", "[fe80::1]", "x", "latest", ""),
    ("example.com/a/b/c/d", "example.com", "a/b/c/d", "latest", ""),
    ("ghcr.io/org/app:v1", "ghcr.io", "org/app", "v1", ""),
    ("registry-1.docker.io/library/nginx", "registry-1.docker.io", "library/nginx", "latest", ""),
    ("nginx:Latest_1.2-rc", "docker.io", "library/nginx", "Latest_1.2-rc", ""),
    ("nginx:_x", "docker.io", "library/nginx", "_x", ""),
    ("nginx:" + "t" * 128, "docker.io", "library/nginx", "t" * 128, ""),
    ("a", "docker.io", "library/a", "latest", ""),
    ("x/a-b--c__d.e_f", "docker.io", "x/a-b--c__d.e_f", "latest", ""),
    # Docker quirks, kept for fidelity: a single component is always a Docker Hub name.
    ("localhost", "docker.io", "library/localhost", "latest", ""),
    ("example.com", "docker.io", "library/example.com", "latest", ""),
    ("localhost:5000", "docker.io", "library/localhost", "5000", ""),
    # distribution: normalize_test.go TestValidateReferenceName / TestParseRepositoryInfo
    ("192.168.0.1", "docker.io", "library/192.168.0.1", "latest", ""),
    ("192.168.0.1:80", "docker.io", "library/192.168.0.1", "80", ""),
    ("192.168.0.1:8/debian", "192.168.0.1:8", "debian", "latest", ""),
    ("127.0.0.1:8000/private/moonbase", "127.0.0.1:8000", "private/moonbase", "latest", ""),
    ("[fc00::1]:5000/docker/docker", "[fc00::1]:5000", "docker/docker", "latest", ""),
    ("[fc00:1:2:3:4:5:6:7]:5000/library/debian",
     "[fc00:1:2:3:4:5:6:7]:5000", "library/debian", "latest", ""),
    ("docker.io/" + HEX, "docker.io", "library/" + HEX, "latest", ""),
    ("docker---rules/docker", "docker.io", "docker---rules/docker", "latest", ""),
    ("dock__er/docker", "docker.io", "dock__er/docker", "latest", ""),
    ("ubuntu-12.04-base", "docker.io", "library/ubuntu-12.04-base", "latest", ""),
    ("other/library", "docker.io", "other/library", "latest", ""),
    ("LOCALDOMAIN/fooo/bar", "LOCALDOMAIN", "fooo/bar", "latest", ""),  # uppercase => a host
    ("Docker/docker", "Docker", "docker", "latest", ""),
    # distribution: reference_test.go TestReferenceParse
    ("test:5000/repo:tag@" + FF, "test:5000", "repo", "tag", FF),
    ("sub-dom1.foo.com/bar/baz/quux:some-long-tag",
     "sub-dom1.foo.com", "bar/baz/quux", "some-long-tag", ""),
    ("b.gcr.io/test.example.com/my-app:test.example.com",
     "b.gcr.io", "test.example.com/my-app", "test.example.com", ""),
    ("xn--7o8h.com/myimage:xn--7o8h.com@" + FF, "xn--7o8h.com", "myimage", "xn--7o8h.com", FF),
    ("lowercase:Uppercase", "docker.io", "library/lowercase", "Uppercase", ""),
    ("[2001:db8::1]:5000/repo:tag@" + FF, "[2001:db8::1]:5000", "repo", "tag", FF),
    ("[2001:db8::]:5000/repo", "[2001:db8::]:5000", "repo", "latest", ""),
])
def test_normalisation(image, registry, repository, tag, digest):
    assert parse(image) == RegistryReference(registry, repository, tag, digest)


@pytest.mark.parametrize("image, full, reference, api_host", [
    ("nginx", "docker.io/library/nginx:latest", "latest", "registry-1.docker.io"),
    ("nginx:1.27", "docker.io/library/nginx:1.27", "1.27", "registry-1.docker.io"),
    ("docker.io/library/nginx:1.27@" + DIGEST, "docker.io/library/nginx:1.27@" + DIGEST, DIGEST,
     "registry-1.docker.io"),
    ("index.docker.io/user/app@" + DIGEST, "docker.io/user/app@" + DIGEST, DIGEST,
     "registry-1.docker.io"),
    ("library/foo/bar:1", "docker.io/library/foo/bar:1", "1", "registry-1.docker.io"),
    ("host:5000/a/b@" + DIGEST, "host:5000/a/b@" + DIGEST, DIGEST, "host:5000"),
    ("localhost/app", "localhost/app:latest", "latest", "localhost"),
    ("[::1]:5000/app:v2", "[::1]:5000/app:v2", "v2", "[::1]:5000"),
    ("[fe80::1]/x", "[fe80::1]/x:latest", "latest", "[fe80::1]"),
    ("ghcr.io/org/app:v1", "ghcr.io/org/app:v1", "v1", "ghcr.io"),
    ("registry-1.docker.io/library/x", "registry-1.docker.io/library/x:latest", "latest",
     "registry-1.docker.io"),
])
def test_rendering(image, full, reference, api_host):
    ref = parse(image)
    assert str(ref) == full
    assert ref.reference == reference
    assert ref.api_host == api_host
    assert full.startswith(ref.name + (":" if ref.tag else "@"))


@pytest.mark.parametrize("image", [
    "nginx", "nginx:1.27", "user/app@" + DIGEST, "nginx:1@" + DIGEST, "localhost:5000/a/b:c",
    "[::1]:5000/app", "example.com/a/b/c/d", "LOCALDOMAIN/fooo", "library/foo/bar",
])
def test_str_round_trip(image):
    ref = parse(image)
    assert parse(str(ref)) == ref


def test_name():
    assert parse("nginx").name == "docker.io/library/nginx"
    assert parse("[::1]:5000/a/b:c").name == "[::1]:5000/a/b"


@pytest.mark.parametrize("image, fragment", [
    # the brief's list
    ("Nginx", "repository name must be lowercase"),
    ("docker/Docker", "repository name must be lowercase"),
    ("docker.io/docker/Docker", "repository name must be lowercase"),
    ("test:5000/Uppercase/lowercase:tag", "repository name must be lowercase"),
    ("Uppercase:tag", "repository name must be lowercase"),
    ("/nginx", "must not start with '/'"),
    ("/abs/path:tag", "oci:/ABSOLUTE/PATH"),
    (DIGEST, "a digest alone names no repository"),
    ("sha256:abc", "a digest alone names no repository"),
    ("sha512:" + HEX * 2, "a digest alone names no repository"),
    (HEX, "image ID"),
    ("1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a", "image ID"),
    ("nginx@", "'@' must be followed by a digest"),
    ("nginx:1@", "'@' must be followed by a digest"),
    ("nginx:", "empty tag after ':'"),
    ("host:5000/app:", "empty tag after ':'"),
    (":justtag", "missing repository name before ':'"),
    ("@" + FF, "missing repository name before '@'"),
    ("nginx@sha512:" + HEX * 2, "only sha256 is supported"),
    ("validname@invaliddigest:" + "f" * 64, "only sha256 is supported"),
    ("nginx@md5:" + HEX[:32], "only sha256 is supported"),
    ("repo@sha256:" + "f" * 34, "invalid digest"),
    ("repo@sha256:" + HEX.upper(), "invalid digest"),
    ("repo@sha256:" + HEX + "0", "invalid digest"),
    ("repo@" + HEX, "invalid digest"),
    ("repo@sha256:" + HEX + "@x", "invalid digest"),
    ("nginx:-tag", "invalid tag '-tag'"),
    ("nginx:.tag", "invalid tag '.tag'"),
    ("nginx:" + "t" * 129, "invalid tag"),
    ("nginx:1:2", "invalid tag '1:2'"),
    ("nginx:tag!", "invalid tag"),
    ("nginx:t\u00e9", "invalid tag"),  # \w is ASCII in Docker's (Go's) grammar
    ("aa/asdf$$^/aa", "invalid repository path component 'asdf$$^'"),
    ("-docker", "invalid repository path component '-docker'"),
    ("-docker/docker", "invalid repository path component '-docker'"),
    ("docker-/docker", "invalid repository path component 'docker-'"),
    ("-docker-/docker", "invalid repository path component '-docker-'"),
    ("____/____", "invalid repository path component '____'"),
    ("_docker/_docker", "invalid repository path component '_docker'"),
    ("x/dock..er", "invalid repository path component 'dock..er'"),
    ("x/dock_.er", "invalid repository path component 'dock_.er'"),
    ("x/dock-.er", "invalid repository path component 'dock-.er'"),
    # distribution reads these first components as hosts ('.'), which they are not
    ("dock..er/docker", "invalid registry host 'dock..er'"),
    ("dock_.er/docker", "invalid registry host 'dock_.er'"),
    ("dock-.er/docker", "invalid registry host 'dock-.er'"),
    ("dock___er/docker", "invalid repository path component 'dock___er'"),
    ("[fc00::1]", "invalid repository path component '[fc00'"),
    ("[fc00::1]:5000", "invalid repository path component"),
    ("docker///docker", "empty path component"),
    ("docker.io/docker///docker", "empty path component"),
    ("docker/", "empty path component"),
    ("localhost/", "repository name must have at least one component"),
    ("example.com/", "repository name must have at least one component"),
    ("-docker.io/docker/docker", "invalid registry host '-docker.io'"),
    ("docker-.io/x", "invalid registry host 'docker-.io'"),
    ("a..b/x", "invalid registry host 'a..b'"),
    ("foo_bar.com/x", "invalid registry host 'foo_bar.com'"),
    ("fc00::1:5000/debian", "invalid port in registry host 'fc00::1:5000'"),
    ("host:/x", "unknown transport 'host:'"),
    ("host:port/x", "invalid port in registry host 'host:port'"),
    ("host:5000:1/x", "invalid port in registry host"),
    ("[fe80::1%eth0]:5000/debian", "invalid IPv6 address '[fe80::1%eth0]'"),
    ("[2001:db8:3:4::192.0.2.33]:5000/debian", "invalid IPv6 address"),
    ("[::1:5000/app", "invalid IPv6 address"),
    ("[]/app", "invalid repository path component '[]'"),
    ("[::1]5000/app", "invalid port in registry host '[::1]5000'"),
    ("https://github.com/docker/docker", "unknown transport 'https:'"),
    ("docker://nginx:1.27", "unknown transport 'docker:'"),
    ("OCI:/abs/path:tag", "unknown transport 'OCI:'"),
    ("oci-archive:/x.tar", "unknown transport 'oci-archive:'"),
    ("example.com/" + "a" * 244, "must not be more than 255 characters"),
    ("a" * 256, "must not be more than 255 characters"),
    ("domain.com/" + "a" * 256 + ":tag", "must not be more than 255 characters"),
    ("this_is_a_long_namespace" * 11 + "/docker",
     "must not be more than 255 characters"),
])
def test_invalid(image, fragment):
    with pytest.raises(InvalidArgument) as e:
        parse(image)
    msg = str(e.value)
    assert fragment in msg
    assert msg.startswith("invalid reference format: ")
    assert repr(image) in msg  # quotes what was given


@pytest.mark.parametrize("image, fragment", [
    ("", "'image' is empty"),
    (" nginx", "malformed: it contains whitespace"),
    ("nginx :1", "malformed: it contains whitespace"),
    ("nginx\n", "malformed: it contains whitespace"),
    ("nginx:1\t", "malformed: it contains whitespace"),
    ("n" * 5000, "malformed: it is too long"),
])
def test_empty_whitespace_and_huge(image, fragment):
    with pytest.raises(InvalidArgument) as e:
        parse(image)
    assert fragment in str(e.value)
    assert len(str(e.value)) < 200


def test_the_name_limit_is_on_the_canonical_name():
    ok = "example.com/" + "a" * 243
    assert len(parse(ok).name) == 255
    # Docker Hub names count "docker.io/library/" too.
    assert parse("a" * 237).name == "docker.io/library/" + "a" * 237
    with pytest.raises(InvalidArgument, match="255"):
        parse("a" * 238)


def test_errors_are_invalid_argument():
    with pytest.raises(InvalidArgument) as e:
        parse("Nginx")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(e.value) == "invalid reference format: repository name must be lowercase: 'Nginx'"


def test_layout_references_still_parse_as_before():
    assert parse("oci:/abs/path:tag") == LayoutReference("/abs/path", "tag")
    assert parse("oci:/p:" + DIGEST) == LayoutReference("/p", DIGEST)
    assert is_digest(DIGEST) and not is_digest(HEX)


# An independent oracle: distribution's grammar assembled as one anchored regex (as
# distribution's Parse uses it), plus ParseNormalizedNamed's domain split, minus this module's
# documented, deliberate refusals. Random strings built from tricky tokens must be accepted or
# refused identically, with the same fields.

_DC = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DC}(?:\.{_DC})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_PC = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_ORACLE = re.compile(
    rf"(?:({_DOMAIN})/)?({_PC}(?:/{_PC})*)(?::(\w[\w.-]{{0,127}}))?(?:@(sha256:[0-9a-f]{{64}}))?",
    re.ASCII,
)


def _oracle(s):
    if re.fullmatch(r"[a-f0-9]{64}", s) or re.fullmatch(r"(?i:sha(?:256|384|512)):[^/@]*", s):
        return None
    if any(c.isspace() for c in s):
        return None
    first, slash, rest = s.partition("/")
    if not slash:
        domain, remainder = "docker.io", "library/" + s
    elif first == "index.docker.io":
        domain, remainder = "docker.io", rest
    elif first == "localhost" or "." in first or ":" in first or first.lower() != first:
        domain, remainder = first, rest
    else:
        domain, remainder = "docker.io", s
    if domain == "docker.io" and "/" not in remainder:
        remainder = "library/" + remainder
    m = _ORACLE.fullmatch(domain + "/" + remainder)
    if not m or m.group(1) != domain or len(m.group(1)) + 1 + len(m.group(2)) > 255:
        return None
    tag, digest = m.group(3) or "", m.group(4) or ""
    return RegistryReference(domain, m.group(2), tag or ("" if digest else "latest"), digest)


_TOKENS = [
    "nginx", "a", "A", "Foo", "library", "docker.io", "index.docker.io", "localhost",
    "example.com", "127.0.0.1", "[::1]", "[fe80::1]", "[", "]", ":5000", ":", "/", "/", "/",
    "@", "@" + DIGEST, DIGEST, "sha512:" + HEX * 2, HEX, ".", "..", "_", "__", "___", "-", "--",
    "1.27", "latest", "v1", "x-y", "a.b", "$", "oci", "É", " ",
]


def test_agrees_with_distribution_grammar_on_random_strings():
    rng = random.Random(20240611)
    accepted = 0
    for _ in range(4000):
        s = "".join(rng.choice(_TOKENS) for _ in range(rng.randint(1, 6)))
        if s.startswith("oci:") or not s:
            continue
        expected = _oracle(s)
        try:
            got = parse(s)
        except InvalidArgument as e:
            assert expected is None, f"{s!r} refused ({e}) but distribution accepts it"
            continue
        assert got == expected, s
        accepted += 1
    assert accepted > 300  # the generator does reach the valid space
