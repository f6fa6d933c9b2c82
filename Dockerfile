# The orders-service image: `orders-server` as a non-root process on 0.0.0.0:50051.
#
#   docker build -t orders-service .
#   docker build --build-arg BASE_IMAGE=localhost/debian-python:bookworm -t orders-service .
#
# BASE_IMAGE is any Debian-like image with Python 3.11+ as `python3` (with its venv module) and
# groupadd/useradd. Both stages use it, so the virtual environment built in the first one finds the
# same interpreter at the same path in the second. Choices and how it was tried: docs/deploy.md.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- build: wheels of the service and its runtime dependencies, installed into /opt/orders ----
FROM ${BASE_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
# .dockerignore keeps tests, docs, benchmarks and local environments out of the context.
COPY . .

# The optional features the image carries: OpenTelemetry tracing (--otel-exporter) and the event
# relay to NATS (--events-url). `--build-arg EXTRAS=` leaves both out.
ARG EXTRAS=otel,events

# Runtime dependencies only (no dev or bench extra), each at its version in constraints.txt; the
# install reads nothing but the wheels built here (--no-index). ./generated is the client package
# orders-service-api, which the server pins exactly and which is not taken from an index. pip and
# setuptools leave the environment afterwards: nothing at run time needs them.
RUN python3 -m venv /opt/orders \
    && /opt/orders/bin/pip wheel --wheel-dir /wheels --constraint constraints.txt ./generated ".${EXTRAS:+[${EXTRAS}]}" \
    && /opt/orders/bin/pip install --no-index --find-links /wheels --constraint constraints.txt \
        "orders-service${EXTRAS:+[${EXTRAS}]}" \
    && /opt/orders/bin/pip uninstall --yes pip setuptools \
    && /opt/orders/bin/orders-server --help > /dev/null

# ---- runtime: the base image, the virtual environment and a user of its own ----
FROM ${BASE_IMAGE} AS runtime

# A fixed numeric UID/GID, so that Kubernetes' runAsNonRoot can check it and volume ownership is
# predictable. /var/lib/orders is the working directory: the embedded SQLite default
# (sqlite:///var/orders.db) lands in /var/lib/orders/var/.
# --no-log-init: no lastlog entry, which for a high UID is a large sparse file in the layer.
RUN groupadd --gid 10001 orders \
    && useradd --uid 10001 --gid orders --no-log-init --no-create-home --home-dir /var/lib/orders \
       --shell /usr/sbin/nologin orders \
    && mkdir -p /var/lib/orders \
    && chown orders:orders /var/lib/orders

COPY --from=build /opt/orders /opt/orders

# ORDERS_HOST: the default 127.0.0.1 would be unreachable from outside the container. The code is
# root-owned and compiled at install time: no .pyc is written at run time.
ENV PATH=/opt/orders/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ORDERS_HOST=0.0.0.0 \
    ORDERS_PORT=50051

LABEL org.opencontainers.image.title="orders-service" \
      org.opencontainers.image.description="Order-processing gRPC service with a transactional outbox and an inventory saga"

WORKDIR /var/lib/orders
USER 10001:10001
EXPOSE 50051

# `orders-server health` exits 0 only while the server answers SERVING; it reads the same ORDERS_*
# variables as the server (port, TLS files, token file), so it follows whatever the container is
# given. The start period covers the interpreter's start and the first database check.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["orders-server", "health"]

# Exec form, no shell: orders-server is PID 1 and receives SIGTERM itself, which starts the graceful
# drain (NOT_SERVING, calls in flight finish within ORDERS_GRACE_PERIOD_S, exit 0). Give the
# engine's stop timeout more than ORDERS_SHUTDOWN_DELAY_S + ORDERS_GRACE_PERIOD_S.
STOPSIGNAL SIGTERM
ENTRYPOINT ["orders-server"]
CMD ["serve"]
