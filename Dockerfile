# syntax=docker/dockerfile:1
# facd-pipeline for x86_64 hosts with an NVIDIA GPU: the whole pipeline (teacher, FACD distillation, ONNX export,
# INT8 quantization, TensorRT engines, verify) in one image.
#
#   mkdir -p runs && docker build -t pipeline .
#   docker run --gpus all -v "$PWD/runs:/work/runs" pipeline all      # run directory lands in ./runs/<name>
#   docker run --gpus all pipeline doctor                             # what the container sees (always exits 0)
#   docker inspect --format '{{.State.Health.Status}}' <container>    # HEALTHCHECK: fails when CUDA is unusable
#
# Base image, pinned: nvcr.io/nvidia/tensorrt:26.04-py3 carries TensorRT 10.16.1, CUDA 13.2.1, Python 3.12
# (Ubuntu 24.04; our package needs Python >= 3.11), and nvcc for `pipeline kernels build`. The host needs a driver
# for CUDA 13 (R580 or newer) and the NVIDIA Container Toolkit. Everything pip adds is CUDA 13 as well: PyPI's torch
# 2.13.0 (CUDA 13.0 build, needs cuda-bindings 13), onnxruntime-gpu (CUDA 13) and cuda-python 13.x, so the
# container's CUDA line and the wheels agree. For TensorRT 11 (strongly typed only) build with
# --build-arg TRT_TAG=26.06-py3 (TensorRT 11.0.0, CUDA 13.3); the code handles both majors.
ARG TRT_TAG=26.04-py3
FROM nvcr.io/nvidia/tensorrt:${TRT_TAG}

# Same torch as the Makefile's TORCH; cuda-python's major follows the container's CUDA (13).
ARG TORCH_SPEC=torch==2.13.0
ARG CUDA_PYTHON_SPEC="cuda-python>=13,<14"
ARG PIPELINE_UID=1000

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The system Python is externally managed (PEP 668): install into a venv that still sees the container's TensorRT
# bindings (--system-site-packages). Ubuntu 24.04 images ship a user `ubuntu` with uid 1000: replace it.
# The distribution's packages are pinned by the base image tag (its apt snapshot), not one by one.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv --system-site-packages /opt/venv \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --home-dir /home/pipeline --uid "${PIPELINE_UID}" --shell /bin/bash pipeline \
    && install -d -o pipeline -g pipeline /work /work/runs /home/pipeline/.cache \
    && chmod 1777 /home/pipeline /home/pipeline/.cache /work/runs

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    HOME=/home/pipeline \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg

# torch first, in its own layer (several GB of CUDA wheels), so a code change does not download it again.
# The versions are pinned by the ARG specs above and by pyproject.toml, which hadolint cannot see through.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH_SPEC}"

# The project itself, non-editable, with the gpu extra (onnxruntime-gpu, cuda-python).
WORKDIR /opt/facd-pipeline
COPY . .
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH_SPEC}" "${CUDA_PYTHON_SPEC}" ".[gpu]" \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('tensorrt') is None and 'no tensorrt in the venv')" \
    && pipeline --version

# `pipeline all` writes runs/<name> relative to the working directory: mount the host's runs/ on /work/runs.
# Caches (fused-kernel builds, the TensorRT timing cache) go to $HOME/.cache/facd-pipeline; keep them across runs
# with -v facd-cache:/home/pipeline/.cache. The user is `pipeline`, named by uid so that hosts and orchestrators can
# check it is not root; a host whose uid is not 1000 adds --user "$(id -u):$(id -g)" (HOME and its cache are 1777).
WORKDIR /work
USER ${PIPELINE_UID}

# Healthy while cuda-python reaches a usable GPU (`pipeline doctor` explains what is missing; it always exits 0).
HEALTHCHECK --interval=5m --timeout=30s --start-period=30s --retries=2 \
    CMD ["/opt/venv/bin/python", "-c", "import sys; from pipeline.engine import cuda_probe; ok, why = cuda_probe(); print(why or 'CUDA device ok'); sys.exit(0 if ok else 1)"]

ENTRYPOINT ["pipeline"]
CMD ["--help"]
