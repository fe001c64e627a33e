"""Deleting private state off the RPC path: a directory leaves its place with one rename
into the store's `trash/`, and a background thread deletes it from there.

An unpublish must leave no trace of the publication under its name (a key is never reused,
and start-up treats every `volumes/KEY` no record names as a crash's leftover), but it need
not wait for the disk to give the blocks back: deleting even a small upper (a handful of
rmdir/unlink on a filesystem mounted `discard`) took most of a warm unpublish, and a pod
that wrote a million files would hold the kubelet for as long as they take. containerd
does the same for its snapshots (`asyncRemove`: rename to a `rm-` name, clean up later).

The rename is atomic and on the same filesystem (`trash/` sits beside `volumes/` under the
store's root). Where it cannot be done (a missing path is nothing to do; the path is a
mount point, or another filesystem) the tree is deleted at once, as before. What is in
`trash/` is deleted by `tree.remove_tree`, so a mount found inside is still never entered:
it is logged and the entry stays. A stop does not wait for the deletions: the thread ends
at the next directory it would enter, and what a stop or a crash left behind is deleted when
the next `Trash` starts (the server's start-up), in the background too.

Until an entry is gone its blocks still count in the filesystem's free space: whoever reads
that (GC's watermarks) can wait for `on_empty`, called each time the queue runs dry.
"""

import logging
import os
import secrets
import threading
from collections.abc import Callable

from csi.tree import Interrupted, remove_tree

log = logging.getLogger(__name__)


class Trash:
    def __init__(self, directory: str):
        """`directory`: the trash dir, on the filesystem of everything discarded into it.
        Nothing runs until `start()`: before that (and in a process that never starts it,
        like the tools) `discard` deletes at once."""
        self.directory = directory
        self.on_empty: Callable[[], None] | None = None  # the thread deleted all it had
        self._cv = threading.Condition()
        self._queue: list[str] = []
        self._busy = False
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> "Trash":
        """Delete in the background from now on, beginning with what is already there
        (the directory is made if missing)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        with self._cv:
            self._queue.extend(os.path.join(self.directory, name)
                               for name in sorted(os.listdir(self.directory)))
            self._thread = threading.Thread(target=self._run, name="trash", daemon=True)
            self._thread.start()
        return self

    def discard(self, path: str) -> None:
        """Take `path` (a directory, or a file) out of its place now; delete it soon. A
        missing path is not an error. Raises what deleting at once raises, when it has to."""
        with self._cv:
            background = self._thread is not None and not self._stopped
        if not background:
            remove_tree(path)
            return
        entry = os.path.join(self.directory,
                             f"{os.path.basename(path)}-{secrets.token_hex(4)}")
        try:
            os.rename(path, entry)
        except FileNotFoundError:
            return
        except OSError as e:  # EBUSY (a mount point), EXDEV: no rename; delete here
            log.debug("cannot move %s to the trash (%s): deleting it now", path, e)
            remove_tree(path)
            return
        with self._cv:
            self._queue.append(entry)
            self._cv.notify()

    def pending(self) -> int:
        """Entries not yet deleted (queued or being deleted)."""
        with self._cv:
            return len(self._queue) + self._busy

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until the queue is empty and nothing is being deleted (what cannot be
        deleted is left in the trash); True if that happened within `timeout` seconds."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._queue and not self._busy
                                     or self._thread is None, timeout=timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop deleting: the thread ends at the next directory it would enter (waited for
        up to `timeout` seconds; a directory of very many files is emptied first). What
        is left stays in the trash for the next start; `discard` deletes at once from now
        on."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout)
            if thread.is_alive():
                log.warning("the trash's thread is still deleting a directory after %.0fs",
                            timeout)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._stopped)
                if self._stopped:
                    self._thread = None
                    self._cv.notify_all()
                    return
                entry = self._queue.pop(0)
                self._busy = True
            try:
                remove_tree(entry, stop=lambda: self._stopped)
            except Interrupted:
                pass  # stopped: the rest of it waits for the next start
            except OSError as e:  # a mount inside (logged by remove_tree), EIO, ...
                log.error("cannot delete %s from the trash: %s; trying again at the next "
                          "start", entry, e)
            except Exception:
                log.exception("cannot delete %s from the trash", entry)
            finally:
                with self._cv:
                    self._busy = False
                    empty = not self._queue and not self._stopped
                    self._cv.notify_all()
            if empty and self.on_empty is not None:
                try:
                    self.on_empty()
                except Exception:
                    log.exception("after emptying the trash")
