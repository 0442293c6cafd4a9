# The runner image: `docker build -t runner:latest .`, then
#   docker run --rm -e DEMO_API_URL=... -v "$PWD/secrets:/run/secrets/runner:ro" \
#     runner:latest run /flows/contacts.yaml --sink postgresql://loader@db/warehouse
# The flows are copied in at /flows (replace flows/ with your own, or mount them there);
# validating them is part of the build, so an image with a broken flow is never made.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Secrets are files here (a Kubernetes Secret volume, Docker secrets); never in the image.
    RUNNER_SECRETS_DIR=/run/secrets/runner

WORKDIR /src
COPY pyproject.toml README.md CHANGELOG.md MANIFEST.in ./
COPY runner ./runner
COPY schemas ./schemas
# The postgres extra: psycopg 3, for the PostgreSQL destination that shards share.
RUN pip install '.[postgres]' && rm -rf /src

COPY flows /flows
RUN runner validate /flows

# A user of its own, not root; numeric, so that runAsNonRoot can check it.
RUN useradd --system --uid 10001 --no-create-home --home-dir /work runner \
    && mkdir -p /work && chown 10001:10001 /work
USER 10001:10001
WORKDIR /work

ENTRYPOINT ["runner"]
CMD ["--help"]
