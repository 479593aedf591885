# syntax=docker/dockerfile:1
# The training / collapse-monitor image:  docker build -t REGISTRY/ctr-multiembed:TAG .
#
# No version is written here: tools/setup_env.py installs the pins of pyproject.toml
# (the `cuda` extra, i.e. [tool.ctr.accelerator]'s torch 2.13.0 / fbgemm-gpu 1.8.0 / torchrec
# 1.8.0; [project] dependencies for the rest), the CUDA build forced by CTR_ACCELERATOR=cuda;
# it reads pyproject.toml with tomllib, so the base image's python3 must be >= 3.11 (24.04
# has 3.12). The base image's CUDA major.minor must be [tool.ctr.accelerator] cuda
# (tests/test_deploy.py checks it).
# The wheels bring their own CUDA libraries; the base image gives the NVIDIA runtime
# its settings (NVIDIA_VISIBLE_DEVICES, NVIDIA_REQUIRE_CUDA) and a matching userland.
ARG CUDA_IMAGE=nvidia/cuda
ARG CUDA_TAG=13.0.0-base-ubuntu24.04

FROM ${CUDA_IMAGE}:${CUDA_TAG} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Dependency layer: only the pins and the installer, so a source change reuses it.
COPY pyproject.toml ./
COPY tools/setup_env.py tools/
RUN CTR_ACCELERATOR=cuda python3 tools/setup_env.py --deps-only --extras cluster --no-system-packages /opt/venv
# The project itself (its dependencies are all in the layer above).
COPY README.md ./
COPY trainer trainer
COPY pipelines pipelines
RUN /opt/venv/bin/pip install --no-deps .

FROM ${CUDA_IMAGE}:${CUDA_TAG}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/ctr ctr
COPY --from=build /opt/venv /opt/venv
# The sources stay in /app too: torchx components run `--script trainer/main.py` and
# `--config configs/...` relative to the working directory.
WORKDIR /app
COPY trainer trainer
COPY pipelines pipelines
COPY configs configs
COPY .torchxconfig ./
RUN install -d -o 10001 -g 10001 /app/runs
# python, torchrun, torchx and the project's modules come from the venv.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/home/ctr
USER 10001:10001
CMD ["python", "-m", "trainer.main", "--help"]
