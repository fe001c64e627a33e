# The node plugin image. Build: docker build -t strata:dev .
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md ./
COPY csi ./csi
RUN pip install --no-cache-dir . && rm -rf /src
ENTRYPOINT ["strata"]
CMD ["serve"]
