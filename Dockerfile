# syntax=docker/dockerfile:1
# cots images. Every install step runs deploy/install.sh, the script CI runs.
#   docker build -t cots:gpu .                                                 serving, CUDA (default)
#   docker build --build-arg BASE_IMAGE=debian:bookworm-slim -t cots:cpu .     serving, CPU only
#   docker build --build-arg BASE_IMAGE=debian:bookworm-slim --target trainer -t cots-trainer .
#   python3 deploy/build_image.py    both with podman on a local Debian base, served and checked
# The base image is the only difference between the GPU and the CPU serving image: a base that
# sets CUDA_VERSION (every nvidia/cuda image does) gets the GPU wheels (install profile `gpu`),
# any other base the CPU ones (`serve`). The serving image has ONNX Runtime and FAISS but no
# torch. Bundles and indexes are never baked in: mount them at /data/bundles, /data/indexes and
# /data/datasets (docs/deploy.md).

ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

# ---- Python 3.11 in a virtual environment and the user `cots`, on any Debian or Ubuntu base -----
FROM ${BASE_IMAGE} AS python
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 COTS_EDITABLE=0 COTS_HOME=/data
# Python comes from the base's own packages (Debian bookworm's python3, Ubuntu 22.04's
# python3.11), installed only when the base lacks it (the mmdebstrap base already has it).
# hadolint ignore=DL3008
RUN if ! python3.11 -c "import ensurepip" 2>/dev/null; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           python3.11 python3.11-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3.11 -m venv /opt/venv \
 && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin cots

# ---- the serving dependencies (the source is bind-mounted, never copied) -----------------------
FROM python AS deps
# pip settings for the install steps only (a package mirror, a wheel directory): never in the
# image's environment. deploy/build_image.py passes the build host's own.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT
RUN --mount=type=bind,target=/src,rw \
    if [ -n "${CUDA_VERSION:-}" ]; then profile=gpu; else profile=serve; fi \
 && bash /src/deploy/install.sh "$profile" && rm -rf /var/lib/apt/lists/*

# ---- trainer: torch for training, export and `cots index rebuild` -------------------------------
# Torch wheels carry their own CUDA libraries, so any base serves: the rebuild job and CPU hosts
# use the Debian one (docker-compose.yml, deploy/build_image.py).
FROM python AS trainer
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT
RUN --mount=type=bind,target=/src,rw \
    bash /src/deploy/install.sh train && rm -rf /var/lib/apt/lists/*
RUN mkdir -p /data/bundles /data/indexes /data/datasets /data/runs && chown -R cots:cots /data
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
ENTRYPOINT ["cots"]
CMD ["index", "rebuild", "/data/indexes/default", "--bundle", "/data/bundles/default", "--data", "/data/datasets/default"]

# ---- serve: the search API (the default target) -------------------------------------------------
FROM deps AS serve
RUN python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
 && cots serve --help > /dev/null
RUN mkdir -p /data/bundles /data/indexes /data/datasets && chown -R cots:cots /data
ENV COTS_BUNDLE=/data/bundles/default COTS_INDEX=/data/indexes/default
# One volume for the whole tree: a single mount at /data (the Kubernetes claim) is not shadowed
# by anonymous volumes below it, and mounts below it (Compose) still work. The gallery images
# are served from the paths the index records, under /data/datasets.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["cots"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
