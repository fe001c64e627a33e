"""Image references as pod authors write them in the `image` volume attribute.

This step accepts the local OCI image-layout form `oci:/ABS/PATH[:TAG]` (skopeo's syntax);
registry references (`nginx:1.27`, `host:5000/app@sha256:…`) are recognised and refused with a
clear INVALID_ARGUMENT until the registry client exists.
"""

import dataclasses
import re

from csi.errors import InvalidArgument

_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclasses.dataclass(frozen=True)
class LayoutReference:
    """An image in a local OCI image layout: `path` is the layout directory, `tag` the
    `org.opencontainers.image.ref.name` annotation of its index entry (or a digest)."""

    path: str
    tag: str = ""

    def __str__(self) -> str:
        return f"oci:{self.path}:{self.tag}" if self.tag else f"oci:{self.path}"


def parse(image: str) -> LayoutReference:
    if not image:
        raise InvalidArgument("volume attribute 'image' is empty")
    if len(image) > 4096 or any(c.isspace() for c in image):
        raise InvalidArgument(f"image reference {image[:80]!r} is malformed")
    if not image.startswith("oci:"):
        raise InvalidArgument(
            f"image {image!r}: registry references are not supported yet; "
            "use a local OCI layout as oci:/ABSOLUTE/PATH:TAG"
        )
    rest = image[len("oci:"):]
    path, tag = rest, ""
    # The tag is whatever follows the last ':' after the last '/', as in skopeo;
    # `oci:/x:sha256:…` names a manifest by digest.
    m = re.fullmatch(r"(.*?):(sha256:[0-9a-f]{64})", rest)
    if m:
        path, tag = m.groups()
    elif ":" in rest.rsplit("/", 1)[-1]:
        path, tag = rest.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise InvalidArgument(f"image {image!r}: invalid tag {tag!r}")
    if not path.startswith("/"):
        raise InvalidArgument(f"image {image!r}: the OCI layout path must be absolute")
    if "/../" in path + "/" or path.endswith("/.."):
        raise InvalidArgument(f"image {image!r}: the OCI layout path must not contain '..'")
    return LayoutReference(path=path.rstrip("/") or "/", tag=tag)


def is_digest(s: str) -> bool:
    return bool(_DIGEST.fullmatch(s))
