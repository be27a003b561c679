# syntax=docker/dockerfile:1
# The feedback service (the judging page, its JSON API, the database): plain
# Python, no torch, no GPU. SQLite is built into Python; PostgreSQL through
# psycopg's binary wheel.
#   docker build -f deploy/docker/feedback.Dockerfile -t REGISTRY/rlhf/feedback:0.1.0 .

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY deploy/docker/constraints.txt /tmp/constraints.txt
COPY pyproject.toml README* ./
COPY rlhf ./rlhf
COPY services ./services
RUN pip install --constraint /tmp/constraints.txt ".[feedback]" \
 && python -c "import services.feedback.server, sqlalchemy, alembic, psycopg"

FROM python:3.11.14-slim-bookworm
RUN groupadd --gid 10001 rlhf \
 && useradd --uid 10001 --gid 10001 --home-dir /home/rlhf --create-home --shell /usr/sbin/nologin rlhf
COPY --from=build /opt/venv /opt/venv
# Read-only root filesystem in the pod: caches under HOME (an emptyDir there).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/rlhf \
    XDG_CACHE_HOME=/home/rlhf/.cache \
    HF_HOME=/home/rlhf/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/rlhf
EXPOSE 8090 9104
ENTRYPOINT ["rlhf"]
CMD ["serve", "feedback", "--help"]
