# syntax=docker/dockerfile:1
#
# One image for every role; the command picks it:
#   docker run ... llamavid-serve            # serve: API + in-process queue + model worker
#   docker run ... llamavid-serve api        # HTTP API only (jobs go through Redis)
#   docker run ... llamavid-serve worker     # GPU worker (consumes jobs from Redis)
#
# Base image: python:3.11-slim rather than nvidia/cuda:*-runtime. The torch wheels on PyPI for
# linux/x86_64 are CUDA builds that bring their own CUDA runtime, cuDNN, cuBLAS and NCCL as
# nvidia-* wheels, so a CUDA base image would only add a second, unused copy of those libraries
# (several GB). The host needs the NVIDIA driver and the NVIDIA Container Toolkit; the driver is
# injected when the container starts with a GPU (`--gpus`, or compose `deploy.resources`).
# decord's wheel bundles its own FFmpeg libraries, so no system ffmpeg is installed; decord ships
# x86_64 wheels only, so build for linux/amd64.
#
# The model is not baked in: mount its folder read-only at /models and point LLAMAVID_MODEL at
# it (e.g. LLAMAVID_MODEL=/models/llama-vid-7b-full-224-video-fps-1).

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# Same pin as the Makefile; override with --build-arg TORCH_VERSION=...
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# 1. torch first and pinned; the constraint keeps later installs from moving it.
RUN python -m venv /opt/venv \
 && echo "torch==${TORCH_VERSION}" > /opt/venv/constraints.txt \
 && pip install "torch==${TORCH_VERSION}"

# 2. Dependencies from pyproject.toml alone (with empty stand-in packages), so that editing the
#    code does not reinstall them.
WORKDIR /opt/llamavid/src
COPY pyproject.toml ./
RUN mkdir model server cache \
 && touch model/__init__.py server/__init__.py cache/__init__.py \
 && pip install -c /opt/venv/constraints.txt ".[server,quant]" \
 && rm -rf build ./*.egg-info model server cache

# 3. The project itself.
COPY . .
RUN pip install -c /opt/venv/constraints.txt --no-deps ".[server,quant]" \
 && rm -rf build ./*.egg-info \
 && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"

# Unprivileged runtime user (numeric, so Kubernetes' runAsNonRoot can verify it); /models is the
# read-only mount point for the weights, /var/lib/llamavid the writable working directory.
RUN groupadd --system --gid 10001 llamavid \
 && useradd --system --uid 10001 --gid llamavid --home-dir /home/llamavid --create-home \
      --shell /usr/sbin/nologin llamavid \
 && mkdir -p /models /var/lib/llamavid \
 && chown llamavid:llamavid /var/lib/llamavid

ENV LLAMAVID_HOST=0.0.0.0 \
    LLAMAVID_PORT=8000 \
    LLAMAVID_WORKER_METRICS_PORT=9400 \
    HF_HOME=/home/llamavid/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /var/lib/llamavid
USER 10001:10001

# 8000: HTTP API and its /metrics; 9400: the worker's Prometheus metrics.
EXPOSE 8000 9400

# Liveness: GET /health on the API port. Roles without the API (the worker) set HEALTHCHECK_URL,
# e.g. http://127.0.0.1:9400/metrics. The long start period covers loading the model.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL') or 'http://127.0.0.1:%s/health' % os.environ.get('LLAMAVID_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["llamavid"]
CMD ["serve"]
