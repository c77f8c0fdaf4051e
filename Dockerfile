# syntax=docker/dockerfile:1
#
# The story service image, in two stages: the builder installs into a virtual
# environment; the runtime copies only that environment, so build tools, the
# build context and pip's work files never reach the image that runs.
#
#   docker build -t story-service:dev .
#   docker run --rm -p 8000:8000 story-service:dev      # offline provider, embedded SQLite
#
# Pin the base by digest as well in your registry mirror when you promote an
# image (python:3.11.14-slim-bookworm@sha256:...); the tag is pinned here.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------
# builder: a virtual environment at /opt/venv with the dependencies, then the app.
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /build

# Dependencies first, from pyproject.toml and the lock alone: this layer is
# rebuilt only when the dependencies change, not on every edit of the code. The
# runtime dependencies are read from pyproject.toml; requirements.lock pins them
# (as constraints, the way the Makefile installs).
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
    && pip install --no-cache-dir --constraint requirements.lock --requirement requirements.txt

# Then the application itself, without touching the dependencies again.
COPY README.md ./
COPY app ./app
RUN pip install --no-cache-dir --no-deps . \
    && python -m compileall -q /opt/venv

# ---------------------------------------------------------------------------
# runtime: the interpreter, the virtual environment, a non-root user.
FROM ${PYTHON_IMAGE} AS runtime

ARG APP_UID=10001
ARG APP_GID=10001

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only on Kubernetes and the
# bytecode was compiled in the builder.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    DATABASE_SQLITE_PATH=/app/data/stories.sqlite3

RUN groupadd --system --gid "${APP_GID}" app \
    && useradd --system --uid "${APP_UID}" --gid app --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin app

WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
# The only place the service writes: the embedded database when DATABASE_URL is unset.
RUN install --directory --owner=app --group=app --mode=0750 /app/data

USER ${APP_UID}:${APP_GID}

EXPOSE 8000

# uvicorn drains on SIGTERM for SHUTDOWN_GRACE_SECONDS (default 35 s). Docker's
# default stop timeout is 10 s: run with `docker stop -t 45` / compose's
# stop_grace_period: 40s, and Kubernetes' terminationGracePeriodSeconds: 45.
STOPSIGNAL SIGTERM

# Standard library only (urllib): the probe cannot break with the app's imports.
HEALTHCHECK --interval=30s --timeout=10s --start-period=5s --retries=3 \
    CMD ["python", "-m", "app.healthcheck"]

CMD ["python", "-m", "app"]
