# Multi-stage build of the workspace binaries: pulse-ingestor, pulse-producer, pulse-processor
# (--workspace: the producer package holds the last two; scripts/check_deploy.py checks that
# this command builds every binary copied below).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# The commit for --version and ingestor_build_info (no .git in the build context):
#   docker build --build-arg GIT_COMMIT=$(git rev-parse --short=12 HEAD) .
ARG GIT_COMMIT=unknown
ENV GIT_COMMIT=$GIT_COMMIT
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY producer ./producer
RUN cargo build --release --locked --workspace --bins \
 && cp target/release/pulse-ingestor target/release/pulse-producer target/release/pulse-processor /usr/local/bin/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 pulse
COPY --from=build /usr/local/bin/pulse-ingestor /usr/local/bin/pulse-producer /usr/local/bin/pulse-processor /usr/local/bin/
USER pulse
EXPOSE 8070
CMD ["pulse-ingestor"]
