"""Checks the `image` attribute where no pull should happen yet (CreateVolume)."""

from csi.image import reference
from csi.image.layout import OciLayout


class Resolver:
    def check(self, image: str) -> None:
        """Syntax for every reference; a local OCI layout is also resolved, so a typo fails
        at PVC creation, not at pod start. Registry images are not contacted here: the
        node pulls them with the pod's own pull secrets."""
        ref = reference.parse(image)
        if isinstance(ref, reference.LayoutReference):
            OciLayout(ref).resolve()
