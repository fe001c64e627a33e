"""Local OCI layouts allowed by the operator, and the `image` check at CreateVolume."""

import os

from csi.errors import InvalidArgument
from csi.image import reference
from csi.image.layout import OciLayout


def check_layout_allowed(ref: reference.LayoutReference, roots: tuple[str, ...]) -> None:
    """With --oci-layout-root set, a pod may name only layouts below those directories:
    otherwise any pod author could mount whatever OCI layout lies anywhere on the node."""
    if not roots:
        return
    real = os.path.realpath(ref.path)
    for root in roots:
        root = os.path.realpath(root)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            return
    raise InvalidArgument(f"image {ref}: local OCI layouts are allowed only under "
                          f"{', '.join(roots)} (--oci-layout-root)")


class Resolver:
    def __init__(self, layout_roots: tuple[str, ...] = ()):
        self.layout_roots = layout_roots

    def check(self, image: str) -> None:
        """Syntax for every reference; a local OCI layout is also resolved, so a typo fails
        at PVC creation, not at pod start. Registry images are not contacted here: the
        node pulls them with the pod's own pull secrets."""
        ref = reference.parse(image)
        if isinstance(ref, reference.LayoutReference):
            check_layout_allowed(ref, self.layout_roots)
            OciLayout(ref).resolve()
