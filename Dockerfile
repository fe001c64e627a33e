# The node plugin image. Build: docker build -t strata:dev .
FROM python:3.11-slim
# e2fsprogs: mkfs.ext4 makes the filesystem image of a size-limited volume (csi/backend/
# loopfs.py names every feature itself, so the version here does not change what it makes).
RUN apt-get update \
    && apt-get install -y --no-install-recommends e2fsprogs \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY csi ./csi
RUN pip install --no-cache-dir . && rm -rf /src
ENTRYPOINT ["strata"]
CMD ["serve"]
