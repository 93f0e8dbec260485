# syntax=docker/dockerfile:1
# imsd — multi-stage build: a wheel is built with the build tools, the final image gets only
# the installed package (with the fleet extra: coredis, imported only in fleet mode), runs as
# a non-root user and keeps no pip cache.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
COPY plugins ./plugins
RUN python -m venv /opt/imsd \
 && /opt/imsd/bin/pip install --no-cache-dir --upgrade "pip>=24" \
 && /opt/imsd/bin/pip install --no-cache-dir ".[fleet]"

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="imsd" \
      org.opencontainers.image.description="Adobe IMS token daemon" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 imsd \
 && useradd --system --uid 10001 --gid imsd --home-dir /nonexistent --shell /usr/sbin/nologin imsd \
 && mkdir -p /etc/imsd/credentials /run/imsd/tokens /var/lib/imsd \
 && chown imsd:imsd /run/imsd /run/imsd/tokens /var/lib/imsd \
 && chmod 0750 /run/imsd /var/lib/imsd
COPY --from=build /opt/imsd /opt/imsd
ENV PATH=/opt/imsd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IMSD_CREDENTIALS_DIR=/etc/imsd/credentials \
    IMSD_OUTPUT_DIR=/run/imsd/tokens \
    IMSD_STATE_DIR=/var/lib/imsd \
    IMSD_SOCKET=/run/imsd/imsd.sock \
    IMSD_METRICS_ADDRESS=0.0.0.0:9464 \
    IMSD_LOG_FORMAT=json
VOLUME ["/etc/imsd/credentials", "/run/imsd", "/var/lib/imsd"]
EXPOSE 9464
USER 10001:10001
HEALTHCHECK --interval=30s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9464/livez', timeout=2).status != 200)"]
ENTRYPOINT ["imsd"]
CMD ["run"]
