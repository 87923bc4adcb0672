# syntax=docker/dockerfile:1
# clipguard: one image for the API and the Celery workers.
#
#   docker build -t clipguard:cpu .                                 # CPU wheels (default, ~1 GB smaller)
#   docker build -t clipguard:cuda --build-arg TORCH_INDEX=cu126 .  # CUDA wheels; needs the NVIDIA container toolkit
#
# TORCH_INDEX names a PyTorch wheel index (https://download.pytorch.org/whl/<TORCH_INDEX>): cpu, cu126,
# cu128, ...; pick one that carries torch>=2.10 for your driver. The CUDA wheels bring their own CUDA
# runtime, so the base image stays python:slim and the host only needs the NVIDIA driver.
#
#   API:    clipguard serve --no-worker --host 0.0.0.0 --port 8000 --workers 2   (the default CMD)
#   worker: celery -A clipguard.worker.celery_app:celery_app worker -Q gpu -c 1 -P prefork -n gpu0@%h
#   flower: celery -A clipguard.worker.celery_app:celery_app flower --port=5555
# Logs are JSON lines (CLIPGUARD_LOG_FORMAT=json); set it to text for a terminal.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch from the chosen index, then clipguard itself ----
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the PyTorch index, so `pip install .` finds torch>=2.10 satisfied and never pulls
# the default (CUDA-bundling) wheel from PyPI into a CPU image.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}" "torch>=2.10" "torchvision>=0.25"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clipguard ./clipguard
COPY app ./app
COPY worker ./worker
# Not editable. The postgres extra (psycopg, psycopg-pool) serves CLIPGUARD_DATABASE_URL=postgresql+psycopg://...
# and the status poll's async reads; the s3 extra (boto3) serves CLIPGUARD_STORAGE_URL=s3://...;
# flower is the optional dashboard (compose profile "ops").
RUN pip install ".[service,s3,postgres]" "flower>=2.0" \
 && python -c "import clipguard.cli, clipguard.app.main, clipguard.worker.celery_app, psycopg, psycopg_pool, boto3, flower"

# ---- runtime: the venv only, no compiler, no source tree, non-root ----
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 clipguard \
 && useradd --system --uid 10001 --gid clipguard --create-home --home-dir /home/clipguard clipguard \
 && mkdir -p /srv/clipguard \
 && chown clipguard:clipguard /srv/clipguard
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CLIPGUARD_HOME=/srv/clipguard \
    CLIPGUARD_LOG_FORMAT=json
WORKDIR /home/clipguard
USER 10001:10001
VOLUME ["/srv/clipguard"]
EXPOSE 8000
# Liveness of the API (the worker service overrides this in docker-compose.yml). No curl in slim: Python.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["clipguard", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]
