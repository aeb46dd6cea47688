# syntax=docker/dockerfile:1
# cots images. Every install step runs deploy/install.sh, the script CI runs.
#   docker build -t cots:gpu .                                   serving, CUDA (default)
#   docker build --build-arg VARIANT=cpu -t cots:cpu .           serving, CPU only
#   docker build --target trainer -t cots-trainer .              train, export, index rebuild
# The serving image has ONNX Runtime and FAISS but no torch. Bundles and indexes are never
# baked in: mount them at /data/bundles, /data/indexes and /data/datasets (docs/deploy.md).

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04
ARG CPU_IMAGE=python:3.11-slim-bookworm

# ---- Python 3.11 in a virtual environment, per base image --------------------------------
FROM ${CPU_IMAGE} AS python-cpu
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 COTS_EDITABLE=0 COTS_HOME=/data
RUN python3 -m venv /opt/venv

FROM ${CUDA_IMAGE} AS python-gpu
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 COTS_EDITABLE=0 COTS_HOME=/data
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv

# ---- the serving dependencies, per variant (the source is bind-mounted, never copied) ----
FROM python-cpu AS deps-cpu
RUN --mount=type=bind,target=/src,rw \
    bash /src/deploy/install.sh serve && rm -rf /var/lib/apt/lists/*

FROM python-gpu AS deps-gpu
RUN --mount=type=bind,target=/src,rw \
    bash /src/deploy/install.sh gpu && rm -rf /var/lib/apt/lists/*

# ---- trainer: torch (CPU wheel) for training, export and `cots index rebuild` -------------
# Torch wheels carry their own CUDA libraries, so the trainer stays on CI's Debian base.
FROM python-cpu AS trainer
# Optional: a package index holding the CPU-only torch wheel (pip reads it from the environment).
ARG PIP_EXTRA_INDEX_URL
RUN --mount=type=bind,target=/src,rw \
    bash /src/deploy/install.sh train && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin cots \
 && mkdir -p /data/bundles /data/indexes /data/datasets /data/runs \
 && chown -R cots:cots /data
VOLUME ["/data/bundles", "/data/indexes", "/data/datasets", "/data/runs"]
WORKDIR /data
USER 10001:10001
ENTRYPOINT ["cots"]
CMD ["index", "rebuild", "--bundle", "/data/bundles/default", "--data", "/data/datasets/default", "--out", "/data/indexes/default"]

# ---- serve: the search API (the default target) ------------------------------------------
# hadolint ignore=DL3006
FROM deps-${VARIANT} AS serve
RUN python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
 && cots serve --help > /dev/null
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin cots \
 && mkdir -p /data/bundles /data/indexes /data/datasets \
 && chown -R cots:cots /data
ENV COTS_BUNDLE=/data/bundles/default COTS_INDEX=/data/indexes/default
# The gallery images are served from the paths the index records, under /data/datasets.
VOLUME ["/data/bundles", "/data/indexes", "/data/datasets"]
WORKDIR /data
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["cots"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
