"""What the store holds and what sharing saves, computed from records (pure functions).

Shared by `strata ls`/`strata df` and the scrape-time metrics, so the two never disagree.
A layer used by k publications saves (k-1) x its size against a private copy per pod.
"""

import dataclasses
from collections.abc import Iterable

from csi.store.state import ImageRecord, Layer, Publication


@dataclasses.dataclass(frozen=True)
class Sharing:
    physical_bytes: int  # every layer in the store, once
    logical_bytes: int  # a private copy of its image for every publication
    saved_bytes: int  # logical minus the layers those publications actually use


def sharing(layers: Iterable[Layer], images: Iterable[ImageRecord],
            pubs: Iterable[Publication]) -> Sharing:
    size = {x.id: x.size for x in layers}
    image_layers = {i.manifest_digest: i.layer_ids for i in images}
    logical = 0
    used: set[str] = set()
    for p in pubs:
        ids = [i for i in image_layers.get(p.manifest_digest, ()) if i in size]
        logical += sum(size[i] for i in ids)
        used.update(ids)
    return Sharing(physical_bytes=sum(size.values()), logical_bytes=logical,
                   saved_bytes=logical - sum(size[i] for i in used))


@dataclasses.dataclass(frozen=True)
class ImageRow:
    name: str
    manifest_digest: str
    layers: int
    size: int
    publications: int
    stages: int


def image_rows(layers, images, pubs, stages) -> list[ImageRow]:
    size = {x.id: x.size for x in layers}
    rows = []
    for img in images:
        rows.append(ImageRow(
            name=img.name, manifest_digest=img.manifest_digest, layers=len(img.layer_ids),
            size=sum(size.get(i, 0) for i in img.layer_ids),
            publications=sum(p.manifest_digest == img.manifest_digest for p in pubs),
            stages=sum(s.manifest_digest == img.manifest_digest for s in stages)))
    return rows

