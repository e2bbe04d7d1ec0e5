# ftpipe worker image: runs Prefect flows (training included) on a CUDA GPU node.
#   docker build -t ftpipe-worker --build-arg CUDA_VERSION=13.0.2 --build-arg TORCH_VERSION=2.14.1 .
#   docker run --gpus all -e PREFECT_API_URL=http://prefect:4200/api ftpipe-worker     # a worker for $FTPIPE_WORK_POOL
# CI lints this file with hadolint and checks that its versions match pyproject.toml (tests/test_worker_image.py).
ARG CUDA_VERSION=13.0.2
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-ubuntu24.04

# Must match the torch pin in pyproject.toml; the wheel must be built for the CUDA version above.
ARG TORCH_VERSION=2.14.1
ARG WORK_POOL=ftpipe-gpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/ftpipe \
    PATH=/opt/ftpipe/bin:$PATH \
    HF_HOME=/data/hf \
    FTPIPE_CACHE=/data/ftpipe \
    FTPIPE_WORK_POOL=${WORK_POOL}

# Ubuntu's packages are pinned by the base image's release (CUDA_VERSION), not one by one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY recipes ./recipes
COPY data_prep ./data_prep
COPY training ./training
COPY evaluation ./evaluation
COPY serving ./serving
COPY governance ./governance
COPY flows ./flows
COPY prefect.yaml ./
COPY --chmod=755 flows/entrypoint.sh /usr/local/bin/ftpipe-entrypoint
RUN pip install "torch==${TORCH_VERSION}" && pip install .

RUN useradd --create-home --uid 10001 ftpipe && mkdir -p /data && chown ftpipe /data
USER 10001
VOLUME ["/data"]

# With no arguments the entrypoint is `prefect worker start --pool $FTPIPE_WORK_POOL`; as the job image of a docker or
# Kubernetes work pool, the worker passes the flow run's command as arguments and the entrypoint runs that instead.
ENTRYPOINT ["/usr/local/bin/ftpipe-entrypoint"]
CMD []
