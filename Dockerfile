# The strata node plugin image.
#   docker build -t strata:dev .
#   docker build --build-arg BASE_IMAGE=mirror.example/library/python:3.11-slim-bookworm .
# Two stages: the first builds wheels for strata and its dependencies (pip, setuptools and
# whatever a source build needs stay there); the second installs those wheels, offline, on
# a slim base with only the Debian packages strata executes at run time.
# tests/deploy/test_dockerfile.py lints this file with hadolint.

# A build argument, so that a registry mirror (or a pinned digest) can be used.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY csi ./csi
RUN pip wheel --wheel-dir /wheels .

FROM ${BASE_IMAGE}
# VERSION: the package version (pyproject.toml; a test keeps the two equal, and the install
# below fails if they differ).
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="strata" \
      org.opencontainers.image.description="Kubernetes CSI node plugin that mounts container images as copy-on-write volumes" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# What strata executes at run time, and nothing else:
# - e2fsprogs (mkfs.ext4): the filesystem image of a volume with a sizeLimit where the
#   store's filesystem does not enforce project quotas (csi/backend/loopfs.py). Loop devices
#   (csi/mount/loop.py), mounts (csi/mount/syscalls.py) and project quotas
#   (csi/backend/quota.py) are syscalls and ioctls: no util-linux mount/losetup and no
#   xfsprogs are needed.
# Not pinned (DL3008): the base image's Debian release fixes the version, and its security
# updates are wanted on every rebuild.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends e2fsprogs \
    && rm -rf /var/lib/apt/lists/*
# The wheels come from the builder only, through a bind mount (BuildKit, the default builder
# of Docker 23+, and buildah): nothing is fetched here, and neither the wheels nor a pip
# cache end up in a layer.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --disable-pip-version-check \
        --find-links=/wheels "strata-csi==${VERSION}"
# The plugin runs as root in a privileged container: it mounts overlayfs, makes whiteout
# device nodes and sets trusted.* xattrs (deploy/base/daemonset.yaml).
ENTRYPOINT ["strata"]
CMD ["serve"]
