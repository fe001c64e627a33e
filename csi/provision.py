"""Controller-side volumes: what CreateVolume hands out for "a writable copy of image X".

A provisioned volume holds no data of its own: its `volume_context` carries the
StorageClass parameters (the `image` above all) to NodeStage/NodePublish, which build the
copy-on-write view on the node. Records live in the same state.db as the node's.
"""

import dataclasses
import logging
import time

from csi.digest import sha256_hex
from csi.errors import AlreadyExists, InvalidArgument, NotFound
from csi.image.resolver import Resolver
from csi.store.state import ControllerVolume, State

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CreateSpec:
    name: str
    required_bytes: int
    limit_bytes: int
    parameters: dict


def volume_id_for(name: str) -> str:
    return "strata-" + sha256_hex(name.encode())[:24]


class Provisioner:
    def __init__(self, state: State, resolver: Resolver | None = None, clock=time.time):
        self._state = state
        self._resolver = resolver or Resolver()
        self._clock = clock

    def create(self, spec: CreateSpec) -> ControllerVolume:
        image = spec.parameters.get("image", "")
        if not image:
            raise InvalidArgument("parameter 'image' is required (the image to mount)")
        # Resolving now turns a typo into an error at PVC creation, not at pod start.
        self._resolver.check(image)
        capacity = spec.required_bytes or spec.limit_bytes
        with self._state.transaction() as tx:
            existing = tx.controller_volume(spec.name)
            if existing is not None:
                if existing.parameters != spec.parameters or not _fits(existing.capacity, spec):
                    raise AlreadyExists(f"volume {spec.name!r} exists with different "
                                        "capacity or parameters")
                log.info("volume %s already exists as %s, nothing to do", spec.name,
                         existing.volume_id)
                return existing
            vol = ControllerVolume(spec.name, volume_id_for(spec.name), capacity,
                                   dict(spec.parameters), self._clock())
            tx.record_controller_volume(vol)
        log.info("created volume %s (%s) for image %s", vol.volume_id, spec.name, image)
        return vol

    def delete(self, volume_id: str) -> None:
        with self._state.transaction() as tx:
            if tx.controller_volume_by_id(volume_id) is None:
                log.info("volume %s does not exist, nothing to delete", volume_id)
                return
            tx.forget_controller_volume(volume_id)
        log.info("deleted volume %s", volume_id)

    def get(self, volume_id: str) -> ControllerVolume:
        with self._state.read() as tx:
            vol = tx.controller_volume_by_id(volume_id)
        if vol is None:
            raise NotFound(f"volume {volume_id} does not exist")
        return vol


def _fits(capacity: int, spec: CreateSpec) -> bool:
    if spec.required_bytes and capacity < spec.required_bytes:
        return False
    return not (spec.limit_bytes and capacity > spec.limit_bytes)
