"""`strata pull`'s output, drawn as `docker pull` draws it: one row per layer of the image
(its layer ID, as `strata ls` shows it) going `Pulling fs layer` → `Downloading 1.2 MiB/4.5
MiB` → `Extracting` → `Pull complete`, or `Already exists`; a retry is a row's state too.

On a terminal the rows are redrawn in place (the cursor moved up over them), at most every
REDRAW seconds while bytes arrive. Elsewhere (a log, a pipe, `kubectl exec` without -t)
each change of a row's state is one line, the byte counts left out, so that no line is ever
printed twice and nothing is printed while nothing happens.

Layers download and unpack concurrently: events come from the pull's threads (pulls.Progress,
the layer store's on_unpack, the blob store's bytes by blob, the transport's retry log
records); one lock orders them with the output. A row is `Downloading` while its blob's
bytes arrive, even once its unpack has started (it unpacks them as they come), then
`Extracting` until its layer is in place.
"""

import re
import threading
import time
from typing import TextIO

from csi.image.manifest import Image, LayerDesc
from csi.pulls import Progress
from csi.store.layers import layer_id
from csi.units import human_bytes

REDRAW = 0.1  # seconds between redraws for bytes alone
DONE = ("Pull complete", "Already exists")
_BLOB = re.compile(r"blob (sha256:[0-9a-f]{64})")


class _Row:
    def __init__(self, size: int, state: str):
        self.size, self.state, self.done = size, state, 0
        self.extracting = False  # its unpack has started (its blob may still be arriving)
        self.shown = ""  # the line last printed for it (not on a terminal)


class PullDisplay(Progress):
    def __init__(self, out: TextIO, tty: bool, width: int = 80, clock=time.monotonic):
        self._out, self._tty, self._width, self._clock = out, tty, width, clock
        self._mu = threading.Lock()
        self._rows: dict[str, _Row] = {}  # by layer ID, in the image's order
        self._by_blob: dict[str, str] = {}  # blob digest → layer ID
        self._current = ""  # the layer whose blob is being fetched
        self._drawn = 0  # rows on the screen (terminal)
        self._drawn_at = 0.0
        self._last_note = ""
        self.fetched = False  # the image was resolved from its source (not from records)
        self.missing = 0  # layers that were not in the store

    # -- what the pull says (pulls.Progress) ---------------------------------------------
    def resolved(self, image: Image, missing: list[LayerDesc]) -> None:
        absent = {layer_id(la.diff_id) for la in missing}
        with self._mu:
            self.fetched, self.missing = True, len(absent)
            for la in image.layers:
                lid = layer_id(la.diff_id)
                self._by_blob[la.digest] = lid
                self._rows.setdefault(lid, _Row(la.size, "Pulling fs layer" if lid in absent
                                                else "Already exists"))
            self._show(*self._rows)

    def fetching(self, layer: LayerDesc) -> None:
        with self._mu:
            self._current = layer_id(layer.diff_id)
            self._set(self._current, "Downloading")

    def unpacking(self, layer: LayerDesc, downloading: bool = False) -> None:
        """The layer's unpack started; while its blob is `downloading` the row stays
        `Downloading` (its bytes are what moves) until the last byte is in."""
        with self._mu:
            lid = layer_id(layer.diff_id)
            row = self._rows.get(lid)
            if row is None:
                return
            row.extracting = True
            if not downloading or row.done >= row.size:
                self._set(lid, "Extracting")

    # -- what the layer store and the transport say ----------------------------------------
    def unpacked(self, diff_id: str) -> None:
        with self._mu:
            self._complete(layer_id(diff_id))

    def received(self, nbytes: int, blob: str = "") -> None:
        """`nbytes` more of the blob `blob` arrived (layers download concurrently); without
        a blob, of the layer fetched last."""
        with self._mu:
            lid = self._by_blob.get(blob, self._current)
            row = self._rows.get(lid)
            if row is None or row.state in DONE:
                return
            row.done += nbytes
            if row.state.startswith("Retrying"):
                # Bytes flow again; a line saying so would repeat the first `Downloading`.
                row.state = "Downloading"
                row.shown = self._line(lid, row)
            if row.extracting and row.done >= row.size:
                self._set(lid, "Extracting")  # all in: what is left is the unpack
            elif self._tty and self._clock() - self._drawn_at >= REDRAW:
                self._draw()

    def retry(self, what: str, error: str, delay: float, attempt: int) -> None:
        """Attempt number `attempt` of a request failed; the next comes in `delay` seconds:
        the state of the layer whose blob it fetches, else a line of its own."""
        m = _BLOB.search(what)
        again = f"Retrying in {delay:.1f}s after attempt {attempt}"
        with self._mu:
            lid = self._by_blob.get(m.group(1), "") if m else ""
            if lid in self._rows:
                self._set(lid, f"{again}: {error}")
            else:
                self._note(f"{again}: {what}: {error}")

    def note(self, text: str) -> None:
        """A line of its own, above the rows."""
        with self._mu:
            self._note(text)

    def finish(self) -> None:
        """The pull is done: every layer is in place. Lines from now on go below the rows,
        which are no longer redrawn."""
        with self._mu:
            for lid in self._rows:
                self._complete(lid)
            self._current = ""
            self._drawn = 0
            self._rows.clear()

    # -- drawing ------------------------------------------------------------------------
    def _complete(self, lid: str) -> None:
        row = self._rows.get(lid)
        if row is not None and row.state not in DONE:
            self._set(lid, "Pull complete")

    def _set(self, lid: str, state: str) -> None:
        row = self._rows.get(lid)
        if row is None or row.state == state:
            return
        row.state = state
        self._show(lid)

    def _line(self, lid: str, row: _Row) -> str:
        line = f"{lid}: {row.state}"
        if row.state == "Downloading":
            line += (f" {human_bytes(min(row.done, row.size))}/{human_bytes(row.size)}"
                     if self._tty else f" {human_bytes(row.size)}")
        return line

    def _show(self, *lids: str) -> None:
        if self._tty:
            self._draw()
            return
        for lid in lids:
            row = self._rows[lid]
            line = self._line(lid, row)
            if line != row.shown:
                row.shown = line
                self._write(line + "\n")

    def _note(self, text: str) -> None:
        if text == self._last_note:
            return
        self._last_note = text
        if not (self._tty and self._drawn):
            self._write(text + "\n")
            return
        # Over the first row, then every row again one line lower.
        self._write(f"\x1b[{self._drawn}A\r\x1b[2K{self._fit(text)}\n")
        self._drawn = 0
        self._draw()

    def _draw(self) -> None:
        up = f"\x1b[{self._drawn}A" if self._drawn else ""
        self._write(up + "".join(f"\r\x1b[2K{self._fit(self._line(lid, row))}\n"
                                 for lid, row in self._rows.items()))
        self._drawn, self._drawn_at = len(self._rows), self._clock()

    def _fit(self, line: str) -> str:
        # A row wider than the terminal wraps, and moving up by rows would then miss.
        return line if len(line) < self._width else line[:max(self._width - 2, 1)] + "…"

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()
