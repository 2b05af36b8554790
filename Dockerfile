# kling-gateway: one process per container; scale with replicas (PostgreSQL + Redis) or --workers.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    KLING_GATEWAY_SERVER_HOST=0.0.0.0 \
    KLING_GATEWAY_SERVER_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY config ./config
# It installs this project itself, with the scale-out backends and the S3 archive client; dependency floors live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir '.[scale,archive]' \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
    && mkdir -p /data \
    && chown gateway /data

USER 10001
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["kling-gateway"]
CMD ["serve"]
