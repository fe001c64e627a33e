"""Turns the `image` volume attribute into a resolved Image and the source of its blobs."""

from csi.image import reference
from csi.image.layout import OciLayout
from csi.image.manifest import Image


class Resolver:
    def resolve(self, image: str, secrets: dict[str, str] | None = None) -> tuple[OciLayout, Image]:
        ref = reference.parse(image)
        source = OciLayout(ref)
        return source, source.resolve()
