# kling-gateway: one process per container; scale with replicas (PostgreSQL + Redis) or --workers.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    KLING_GATEWAY_SERVER_HOST=0.0.0.0 \
    KLING_GATEWAY_SERVER_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY gateway ./gateway
COPY config ./config
# This project itself, with the scale-out backends, the S3 archive client and OpenTelemetry tracing (on only when
# OTEL_EXPORTER_OTLP_ENDPOINT is set); every dependency pinned by constraints.txt (regenerate: .venv/bin/python deploy/freeze_constraints.py > constraints.txt).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir -c constraints.txt '.[scale,archive,otel]' \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin gateway \
    && mkdir -p /data \
    && chown gateway /data

USER 10001
# No VOLUME: replicas keep their state in PostgreSQL and Redis. A single SQLite instance mounts one on /data itself.
EXPOSE 8080
# Asks /healthz on the port the gateway is configured with (KLING_GATEWAY_SERVER_PORT or $KLING_GATEWAY_CONFIG);
# a port given as `serve --port` on the command line is not seen here: set it in the environment instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; from gateway.config import load_settings; s = load_settings().server; h = s.host if s.host not in ('0.0.0.0', '::', '') else '127.0.0.1'; h = f'[{h}]' if ':' in h else h; sys.exit(urllib.request.urlopen(f'http://{h}:{s.port}/healthz', timeout=2).status != 200)"]
ENTRYPOINT ["kling-gateway"]
CMD ["serve"]
