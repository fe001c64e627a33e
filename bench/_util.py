"""Helpers the benchmarks share."""

import socket
import subprocess


def drop_caches() -> None:
    """Cold runs start from an empty page cache (PERFORMANCE.md); needs root."""
    subprocess.run(["sync"], check=True)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
