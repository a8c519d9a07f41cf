# CPU image of a Cortex node: the pinned CPU build of torch, then the project.
FROM python:3.11-slim

# libp2p compiles fastecdsa against GMP.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential libgmp-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cortex
# torch goes first from the CPU index: from PyPI, pip would pull a CUDA build of several GB.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY cortex ./cortex
COPY events ./events
COPY replay ./replay
RUN pip install --no-cache-dir .

# The node's identity, config, log and pid file live in this volume.
VOLUME /data
# cortex init, node start and node stop use /data/config.yaml when no --config is given.
ENV CORTEX_HOME=/data
ENTRYPOINT ["cortex"]
CMD ["node", "start", "--config", "/data/config.yaml"]
