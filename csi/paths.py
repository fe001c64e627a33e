"""The store's on-disk layout under `--root`: every path strata uses is joined here, once.

```
state.db              SQLite (WAL): layers, images, tags, stages, publications, references
serve.lock            exclusive flock of the one `strata serve` on the store; says who holds it
store.lock            shared flock held by every process using the store (serve, pull, gc)
layers.lock           orders layer-directory renames between unpack and GC, across processes
boot_id               the kernel boot the last server started in (a reboot ends every overlay)
blobs/sha256/HEX      compressed blobs being pulled (a cache)
layers/ID/fs          one unpacked layer, shared by every image and publication using it
volumes/KEY/          one publication's private state, owned by the storage backend
                      (overlay: upper/, work/, and lower/ links when options run long;
                      a size-limited one: fs.img mounted at fs/, upper/ and work/ in it)
tmp/                  unpacks and downloads in progress
trash/                private state no publication uses any more (unpublish, repairs),
                      renamed here and deleted in the background
```
Layer IDs are short (16 hex digits of the DiffID) so that long `lowerdir=` lists fit in the
page of options mount(2) accepts. Publication KEYs are random, so a publication's directory
never outlives its record under the same name.
"""

import dataclasses
import os

DIRS = ("tmp", "layers", "volumes", "trash", "blobs/sha256")
NEEDED = ("tmp", "layers", "volumes")  # blobs/ is a cache an operator may prune


@dataclasses.dataclass(frozen=True)
class StorePaths:
    root: str

    def __post_init__(self) -> None:
        # One spelling of the root (`/var/lib/strata/` is `/var/lib/strata`): it is part of
        # the mount source by which start-up recognises this store's overlays.
        object.__setattr__(self, "root", os.path.normpath(self.root))

    @property
    def state_db(self) -> str:
        return os.path.join(self.root, "state.db")

    @property
    def serve_lock(self) -> str:
        return os.path.join(self.root, "serve.lock")

    @property
    def store_lock(self) -> str:
        return os.path.join(self.root, "store.lock")

    @property
    def layers_lock(self) -> str:
        return os.path.join(self.root, "layers.lock")

    @property
    def boot_id(self) -> str:
        return os.path.join(self.root, "boot_id")

    @property
    def tmp(self) -> str:
        return os.path.join(self.root, "tmp")

    @property
    def trash(self) -> str:
        return os.path.join(self.root, "trash")

    @property
    def blobs(self) -> str:
        return os.path.join(self.root, "blobs", "sha256")

    @property
    def layers(self) -> str:
        return os.path.join(self.root, "layers")

    @property
    def volumes(self) -> str:
        return os.path.join(self.root, "volumes")

    def layer(self, layer_id: str) -> str:
        """The layer's own directory (`fs/` inside it is what overlay stacks)."""
        return os.path.join(self.layers, layer_id)

    def layer_fs(self, layer_id: str) -> str:
        return os.path.join(self.layers, layer_id, "fs")

    def volume(self, key: str) -> str:
        return os.path.join(self.volumes, key)

    def volume_part(self, key: str, *parts: str) -> str:
        """A named part of a publication's directory (`upper`, `work`, `fs/upper`, ...)."""
        return os.path.join(self.volumes, key, *parts)

    def make(self) -> "StorePaths":
        """Create the root and its directories (private to root: layers hold other users'
        files with their owners' modes, and uppers hold what pods wrote)."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        for sub in DIRS:
            os.makedirs(os.path.join(self.root, sub), mode=0o700, exist_ok=True)
        return self

    def complete(self) -> bool:
        """Whether the directories publishing needs are there (Probe's question)."""
        return all(os.path.isdir(os.path.join(self.root, sub)) for sub in NEEDED)
