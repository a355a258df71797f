# One image for the runtime (`piggyback serve --config ...`) and the operator (`piggyback-operator run`).
# TORCH_INDEX selects the torch build: CPU by default; e.g. https://download.pytorch.org/whl/cu128 for GPUs.
FROM python:3.11-slim AS base
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# torch first and pinned: anything depending on torch installed before it would pull another build.
RUN pip install --index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY runtime ./runtime
COPY operator ./operator
RUN pip install . && rm -rf /src
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp piggyback
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000 8080 9090
# No ENTRYPOINT: the runtime Deployment runs `piggyback serve ...`, the operator `piggyback-operator run`.
CMD ["piggyback", "--help"]
