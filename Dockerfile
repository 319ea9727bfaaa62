# syntax=docker/dockerfile:1
# The four userstream services in one image; docker-compose.yml picks the
# binary per service with `command:` (command-api, query-api, projector or
# notifier).

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS builder
# librdkafka is compiled from source by rdkafka-sys: C/C++ toolchain and cmake,
# and linked against OpenSSL for Kafka TLS and SCRAM.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
    && mkdir -p /out \
    && cp target/release/command-api target/release/query-api target/release/projector \
       target/release/notifier /out/

# ---- run --------------------------------------------------------------------
FROM debian:bookworm-slim
# curl is only for the healthchecks in docker-compose.yml; libssl3 for
# librdkafka's TLS; ca-certificates for every TLS client.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 userstream \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin userstream
COPY --from=builder /out/command-api /out/query-api /out/projector /out/notifier /usr/local/bin/
USER 10001:10001
ENV RUST_LOG=info \
    LOG_FORMAT=json
EXPOSE 3001 3002 3003 3004
CMD ["command-api"]
