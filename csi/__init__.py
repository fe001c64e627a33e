"""strata: a CSI node plugin that mounts container images as copy-on-write volumes."""

from importlib import metadata

DRIVER_NAME = "strata.csi.dev"

try:
    __version__ = metadata.version("strata-csi")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
