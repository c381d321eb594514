# syntax=docker/dockerfile:1
# One image for every role (worker, migrate, emulator, flower, CLI): the command picks the role,
# e.g. `docker run IMAGE worker` or `docker run IMAGE submit card.jpg`.

# -- build: turn the project (and its dependencies) into wheels, so the runtime stage needs no
#    compiler and carries no build tools.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY models ./models
COPY migrations ./migrations
COPY emulator ./emulator
COPY demo ./demo
RUN pip wheel --wheel-dir /wheels .

# -- runtime
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels 'macao-ocr[emulator]' \
    && rm -rf /wheels

# A fixed non-root uid/gid so mounted volumes can be chowned to it on the host.
RUN groupadd --system --gid 10001 macao \
    && useradd --system --uid 10001 --gid macao --home-dir /app --shell /usr/sbin/nologin macao \
    && mkdir -p /app/data \
    && chown -R macao:macao /app
WORKDIR /app
USER macao:macao

# Defaults for a lone container; compose overrides the database and broker.
ENV MACAO_OCR_DATABASE_URL=sqlite:////app/data/macao-ocr.db \
    MACAO_OCR_LOG_JSON=true

# 9808 worker metrics, 8089 emulator, 5555 flower.
EXPOSE 9808 8089 5555

# Roles differ in what "healthy" means, so each compose service declares its own healthcheck
# (python is on PATH for urllib-based probes; no curl needed). A bare container checks that the
# CLI itself loads.
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["macao-ocr", "--help"]

ENTRYPOINT ["macao-ocr"]
CMD ["--help"]
