# syntax=docker/dockerfile:1
# The trainer (SFT, reward model, online PPO; torch), for NVIDIA GPUs.
#   docker build -f deploy/docker/trainer.Dockerfile -t REGISTRY/rlhf/trainer:0.1.0 .
# torch's wheel brings its own CUDA libraries; the CUDA base image brings the
# driver hooks (NVIDIA_* variables) the container toolkit reads.

FROM nvidia/cuda:13.0.2-base-ubuntu24.04 AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/docker/constraints.txt /tmp/constraints.txt
COPY pyproject.toml README* ./
COPY rlhf ./rlhf
COPY services ./services
RUN pip install --constraint /tmp/constraints.txt ".[trainer,feedback]"

FROM nvidia/cuda:13.0.2-base-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive
# torch.compile's Triton kernels build C launchers at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 rlhf \
 && useradd --uid 10001 --gid 10001 --home-dir /home/rlhf --create-home --shell /usr/sbin/nologin rlhf
COPY --from=build /opt/venv /opt/venv
# Read-only root filesystem in the pod: caches under HOME (an emptyDir there).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/rlhf \
    XDG_CACHE_HOME=/home/rlhf/.cache \
    HF_HOME=/home/rlhf/.cache/huggingface \
    MPLCONFIGDIR=/home/rlhf/.config/matplotlib \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/rlhf
EXPOSE 50053 9103
ENTRYPOINT ["rlhf"]
CMD ["train", "ppo", "--config", "/etc/rlhf/ppo.yaml", "--resume"]
