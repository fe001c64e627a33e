"""Durable before recorded: what the store syncs before state.db may name it, and why
nothing else is synced.

state.db runs WAL with `synchronous=NORMAL`: a commit reaches the disk at the next WAL sync,
in order with the other commits, but with no ordering against the files strata writes beside
it. After a power cut (or a kernel crash: a kill -9 of strata loses nothing the kernel
holds) the page cache is gone, and the database may remember a commit whose files never
reached the disk.

- **A layer** (LayerStore._unpack): one `syncfs(2)` of the store's filesystem after the
  layer is unpacked in `tmp/` and before the rename into `layers/ID` and the commit that
  records it. Without it, the record (and, on a filesystem that journals the rename before
  the delayed-allocation data, `layers/ID/fs` itself) could survive with empty or
  zero-filled files, which start-up cannot tell from the real ones, and every pod of every
  image with that layer would mount the damage. One syncfs rather than an fsync per file: a
  layer is thousands of files and one call writes them back in one pass. Its cost: it also
  writes back whatever else is dirty on that filesystem (the uppers of running pods when
  they share it), and bench/unpack.py measures it.
  The rename itself need not be durable before the commit: a record whose `layers/ID` is
  missing after a power cut is found at start-up (reconcile forgets the layer and the images
  that contain it, and their next publish pulls it again), a layer with damaged files is not.
- **A publication**: nothing. After a power cut (as after any reboot) every mount is gone,
  so start-up forgets every publication and removes its private state (`volumes/KEY`:
  upper, work, a size-limited volume's filesystem image), whatever of it reached the disk:
  no record of a publication outlives its mount, and an upper is never mounted again
  (writable overlays are even mounted `volatile`, see mount/spec.py).
- **A stage** records an image whose layers are recorded (so durable) and makes no files.
- **Blobs** are a cache checked against their digest whenever they are read; a damaged one
  is evicted and fetched again (pulls.py, image/registry.py).
- **Removal** (GC, unpublish) commits the forget first and deletes after: a forget lost in a
  power cut leaves a record whose directory may be gone, which start-up handles as above.
"""

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """Write back, and wait for, every dirty page and inode of the filesystem that holds the
    open file `fd`. Raises OSError (EIO, ENOSPC, ...) when writeback failed since `fd` was
    opened (Linux 5.8+ samples the filesystem's error state at open): open it before the
    first byte it must vouch for is written."""
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")
