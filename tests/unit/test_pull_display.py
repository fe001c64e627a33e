"""`strata pull`'s display (progress.PullDisplay) fed events as a pull sends them, and the one
size formatter (units.human_bytes). Pure logic: the output goes to a StringIO, time is a
counter the test moves."""

import io

import pytest

from csi.image.manifest import Image, LayerDesc
from csi.progress import PullDisplay
from csi.store.layers import layer_id
from csi.units import human_bytes

GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


def desc(n: int, size: int) -> LayerDesc:
    return LayerDesc("sha256:" + f"{n:02x}" * 32, GZIP, size, "sha256:" + f"{n + 100:02x}" * 32)


BASE, APP = desc(1, 3 << 20), desc(2, 12 << 20)
IMAGE = Image("r:5000/team/app:1", "sha256:" + "e" * 64, "sha256:" + "c" * 64, (BASE, APP))
B, A = layer_id(BASE.diff_id), layer_id(APP.diff_id)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def pull(d: PullDisplay, missing=(APP,), clock=None) -> None:
    """The events of a pull that fetches `missing`, bytes in 1 MiB reads."""
    d.resolved(IMAGE, list(missing))
    for layer in missing:
        d.fetching(layer)
        for _ in range(layer.size >> 20):
            if clock is not None:
                clock.now += 0.05
            d.received(1 << 20)
        d.unpacking(layer)
        d.unpacked(layer.diff_id)
    d.finish()


def test_plain_output_is_one_line_per_change():
    out = io.StringIO()
    d = PullDisplay(out, tty=False)
    d.note("1: Pulling from team/app")
    pull(d)
    d.note("Digest: sha256:x")
    assert out.getvalue().splitlines() == [
        "1: Pulling from team/app",
        f"{B}: Already exists",
        f"{A}: Pulling fs layer",
        f"{A}: Downloading 12.0 MiB",
        f"{A}: Extracting",
        f"{A}: Pull complete",
        "Digest: sha256:x",
    ]


def test_plain_output_never_repeats_a_line():
    out = io.StringIO()
    d = PullDisplay(out, tty=False)
    d.resolved(IMAGE, [BASE, APP])
    d.resolved(IMAGE, [BASE, APP])  # nothing changed: nothing printed
    for _ in range(3):  # the same record thrice (a logger with two handlers): one line
        d.retry("image r:5000/team/app:1: manifest 1 from http://r:5000", "HTTP 503", 0.5, 1)
    d.fetching(BASE)
    for attempt in (1, 2):
        d.retry(f"image x: blob {BASE.digest} from http://r:5000", "HTTP 429", 1.0, attempt)
        d.received(100)  # bytes again: downloading again, no line for it
    d.fetching(APP)  # layers download concurrently: BASE is not done for that
    d.finish()  # BASE was unpacked by another process meanwhile: complete
    lines = out.getvalue().splitlines()
    assert len(lines) == len(set(lines)), lines
    assert lines == [
        f"{B}: Pulling fs layer", f"{A}: Pulling fs layer",
        "Retrying in 0.5s after attempt 1: image r:5000/team/app:1: manifest 1 from "
        "http://r:5000: HTTP 503",
        f"{B}: Downloading 3.0 MiB",
        f"{B}: Retrying in 1.0s after attempt 1: HTTP 429",
        f"{B}: Retrying in 1.0s after attempt 2: HTTP 429",
        f"{A}: Downloading 12.0 MiB",
        f"{B}: Pull complete",
        f"{A}: Pull complete",
    ]


def test_concurrent_layers_count_their_own_bytes_and_extract_as_they_stream():
    """Both layers download at once (bytes arrive by blob, interleaved) and each unpack
    starts while its blob streams in: a row stays Downloading until its last byte, then
    Extracting, then complete when its layer is in place."""
    out, clock = io.StringIO(), Clock()
    d = PullDisplay(out, tty=True, width=80, clock=clock)
    d.resolved(IMAGE, [BASE, APP])
    d.fetching(BASE)
    d.fetching(APP)
    d.unpacking(BASE, downloading=True)
    d.unpacking(APP, downloading=True)
    for _ in range(3):
        clock.now += 1
        d.received(1 << 20, BASE.digest)
        clock.now += 1
        d.received(1 << 20, APP.digest)
    rows = out.getvalue().rsplit("\x1b[2A", 1)[1]
    assert f"{B}: Extracting" in rows, "all of BASE's 3 MiB are in"
    assert f"{A}: Downloading 3.0 MiB/12.0 MiB" in rows, "APP counts its own bytes only"
    d.unpacked(BASE.diff_id)
    rows = out.getvalue().rsplit("\x1b[2A", 1)[1]
    assert f"{B}: Pull complete" in rows and f"{A}: Downloading" in rows


def test_nothing_new_is_nothing_but_present_layers():
    out = io.StringIO()
    d = PullDisplay(out, tty=False)
    pull(d, missing=())
    assert out.getvalue().splitlines() == [f"{B}: Already exists", f"{A}: Already exists"]
    assert d.fetched and d.missing == 0


def test_a_terminal_redraws_the_rows_in_place():
    out, clock = io.StringIO(), Clock()
    d = PullDisplay(out, tty=True, width=80, clock=clock)
    d.note("1: Pulling from team/app")
    pull(d, clock=clock)
    d.note("Status: Downloaded newer image for r:5000/team/app:1")
    text = out.getvalue()
    assert text.startswith("1: Pulling from team/app\n")
    assert "\x1b[2A" in text, "the cursor goes back up over the two rows"
    assert f"{A}: Downloading 0 B/12.0 MiB" in text
    # Throttled: 12 reads 50 ms apart redraw about every 100 ms, not at each read.
    shown = [f"{A}: Downloading {n}.0 MiB/12.0 MiB" in text for n in range(1, 13)]
    assert 3 <= sum(shown) < 12, shown
    final = text.rsplit("\x1b[2A", 1)[1]  # the last redraw, then what follows it
    assert final == (f"\r\x1b[2K{B}: Already exists\n\r\x1b[2K{A}: Pull complete\n"
                     "Status: Downloaded newer image for r:5000/team/app:1\n")


def test_a_note_on_a_terminal_goes_above_the_rows():
    out = io.StringIO()
    d = PullDisplay(out, tty=True, width=80, clock=Clock())
    d.resolved(IMAGE, [APP])
    d.fetching(APP)
    d.note("Retrying in 1.0s: something")
    tail = out.getvalue().rsplit("\x1b[2A", 1)[1]
    assert tail == (f"\r\x1b[2KRetrying in 1.0s: something\n\r\x1b[2K{B}: Already exists\n"
                    f"\r\x1b[2K{A}: Downloading 0 B/12.0 MiB\n")


def test_a_row_wider_than_the_terminal_is_cut():
    out = io.StringIO()
    d = PullDisplay(out, tty=True, width=30, clock=Clock())
    d.resolved(IMAGE, [APP])
    d.retry(f"blob {APP.digest}", "a long reason " * 10, 1.0, 1)
    rows = out.getvalue().rsplit("\x1b[2K", 1)[1]
    assert len(rows.rstrip("\n")) == 29 and rows.rstrip("\n").endswith("…")


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1, "1 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
    ((1 << 20) - 1, "1.0 MiB"), (1 << 20, "1.0 MiB"), (int(21.3 * (1 << 20)), "21.3 MiB"),
    (1 << 30, "1.0 GiB"), (5 << 40, "5.0 TiB"), (3 << 50, "3.0 PiB"), (2 << 60, "2.0 EiB"),
    (2 << 70, "2048.0 EiB"), (-2048, "-2.0 KiB"), (512.4, "512 B"),
])
def test_human_bytes(n, text):
    assert human_bytes(n) == text
