# facd-pipeline in one image: the whole pipeline (teacher, FACD distillation, ONNX export, INT8 quantization,
# TensorRT engines where a GPU is, verify). Two targets share every step but the base image and the extra:
#
#   gpu (the default): x86_64 hosts with an NVIDIA GPU; TensorRT plans, ONNX Runtime's CUDA provider, CUDA training.
#     mkdir -p runs && docker build -t pipeline .
#     docker run --gpus all -v "$PWD/runs:/work/runs" pipeline all      # run directory lands in ./runs/<name>
#   cpu: any x86_64 host; PyTorch's CPU build and ONNX Runtime's CPU provider (verify skips TensorRT, saying why).
#     mkdir -p runs && docker build --target cpu -t pipeline .
#     docker run --rm -v "$PWD/runs:/work/runs" pipeline all
#
#   docker run pipeline doctor                                        # what the container sees (always exits 0)
#   docker inspect --format '{{.State.Health.Status}}' <container>    # HEALTHCHECK: the target's compute path works
#
# gpu base image, pinned: nvcr.io/nvidia/tensorrt:26.04-py3 carries TensorRT 10.16.1, CUDA 13.2.1, Python 3.12
# (Ubuntu 24.04; our package needs Python >= 3.11), and nvcc for `pipeline kernels build`. The host needs a driver
# for CUDA 13 (R580 or newer) and the NVIDIA Container Toolkit. Everything pip adds is CUDA 13 as well: PyPI's torch
# 2.13.0 (CUDA 13.0 build, needs cuda-bindings 13), onnxruntime-gpu (CUDA 13) and cuda-python 13.x, so the
# container's CUDA line and the wheels agree. For TensorRT 11 (strongly typed only) build with
# --build-arg TRT_TAG=26.06-py3 (TensorRT 11.0.0, CUDA 13.3); the code handles both majors.
# cpu base image: python:3.11-slim-bookworm (Debian 12, Python 3.11); torch 2.13.0+cpu from PyTorch's CPU index.
#
# The cpu stage comes first: Docker's legacy builder builds every stage up to --target, so `--target cpu` never
# needs NVIDIA's registry.
ARG CPU_BASE=python:3.11-slim-bookworm
ARG TRT_TAG=26.04-py3

FROM ${CPU_BASE} AS cpu
# What differs between the targets: the extra, torch's index (its CPU or CUDA build) and the module the venv must see.
ARG EXTRA=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG VENV_MODULE=onnxruntime
# --- shared steps: identical in both targets (tests/test_docker.py checks it) ---
# Same torch as the Makefile's TORCH.
ARG TORCH_SPEC=torch==2.13.0
ARG PIPELINE_UID=1000
# `pipeline all` writes runs/<name> relative to the working directory: mount the host's runs/ on /work/runs.
WORKDIR /work
# A venv that still sees the base's own Python packages (--system-site-packages: the gpu base's TensorRT bindings).
# The runs folder is a volume (PIPELINE_RUNS_VOLUME): `pipeline` refuses to start a run there when none is mounted.
RUN python3 -m venv --system-site-packages /opt/venv \
    && useradd --create-home --home-dir /home/pipeline --uid "${PIPELINE_UID}" --shell /bin/bash pipeline \
    && install -d -o pipeline -g pipeline /work /home/pipeline/.cache \
    && chmod 1777 /home/pipeline /home/pipeline/.cache
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    HOME=/home/pipeline \
    PIPELINE_RUNS_VOLUME=/work/runs \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg
# torch first, in its own layer, so a code change does not download it again; the index decides its build (CUDA or
# CPU). The versions are pinned by the ARG specs above and by pyproject.toml, which hadolint cannot see through.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
# The project itself, non-editable, with the target's extra.
COPY . /opt/facd-pipeline
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH_SPEC}" "/opt/facd-pipeline[${EXTRA}]" \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('${VENV_MODULE}') is None and 'no ${VENV_MODULE} in the venv')" \
    && pipeline --version
# Caches (fused-kernel builds, the TensorRT timing cache) go to $HOME/.cache/facd-pipeline; keep them across runs
# with -v facd-cache:/home/pipeline/.cache. The user is `pipeline`, named by uid so that hosts and orchestrators can
# check it is not root; a host whose uid is not 1000 adds --user "$(id -u):$(id -g)" (HOME and its cache are 1777).
USER ${PIPELINE_UID}
ENTRYPOINT ["pipeline"]
CMD ["--help"]
# --- end of the shared steps ---
# Healthy while PyTorch and ONNX Runtime's CPU provider compute (`pipeline doctor` says more; it always exits 0).
HEALTHCHECK --interval=5m --timeout=30s --start-period=30s --retries=2 \
    CMD ["/opt/venv/bin/python", "-c", "import sys; from pipeline.doctor import cpu_probe; ok, why = cpu_probe(); print(why or 'CPU path ok'); sys.exit(0 if ok else 1)"]

# The steps only the gpu target has: the NGC image lacks python3-venv and ships a user `ubuntu` with uid 1000; and
# cuda-python must follow the container's CUDA (13), which pyproject.toml's gpu extra (cuda-python>=12) leaves open.
# The distribution's packages are pinned by the base image tag (its apt snapshot), not one by one.
FROM nvcr.io/nvidia/tensorrt:${TRT_TAG} AS gpu-base
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && echo "cuda-python>=13,<14" > /etc/pip-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip-constraints.txt

FROM gpu-base AS gpu
ARG EXTRA=gpu
ARG TORCH_INDEX=https://pypi.org/simple
ARG VENV_MODULE=tensorrt
# --- shared steps: as in the cpu target above (tests/test_docker.py checks they are identical) ---
ARG TORCH_SPEC=torch==2.13.0
ARG PIPELINE_UID=1000
WORKDIR /work
RUN python3 -m venv --system-site-packages /opt/venv \
    && useradd --create-home --home-dir /home/pipeline --uid "${PIPELINE_UID}" --shell /bin/bash pipeline \
    && install -d -o pipeline -g pipeline /work /home/pipeline/.cache \
    && chmod 1777 /home/pipeline /home/pipeline/.cache
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    HOME=/home/pipeline \
    PIPELINE_RUNS_VOLUME=/work/runs \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
COPY . /opt/facd-pipeline
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH_SPEC}" "/opt/facd-pipeline[${EXTRA}]" \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('${VENV_MODULE}') is None and 'no ${VENV_MODULE} in the venv')" \
    && pipeline --version
USER ${PIPELINE_UID}
ENTRYPOINT ["pipeline"]
CMD ["--help"]
# --- end of the shared steps ---
# Healthy while cuda-python reaches a usable GPU (`pipeline doctor` explains what is missing; it always exits 0).
HEALTHCHECK --interval=5m --timeout=30s --start-period=30s --retries=2 \
    CMD ["/opt/venv/bin/python", "-c", "import sys; from pipeline.backends.trt_engine import cuda_probe; ok, why = cuda_probe(); print(why or 'CUDA device ok'); sys.exit(0 if ok else 1)"]
