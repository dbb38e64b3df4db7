# syntax=docker/dockerfile:1
# The queue-worker image: a static-ish Rust binary on distroless (glibc, CA certificates, no
# shell), running as a non-root user. Build: docker build -t queue-worker:0.1.0 .

# --- build -------------------------------------------------------------------------------------
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src

# Dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml or Cargo.lock
# change, not on every source edit. Stub targets stand in for the real ones.
# The profile must be the same in both builds, or the dependencies are rebuilt.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src tests/it \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs tests/it/main.rs \
    && cargo build --release --locked --bin queue-worker \
    && rm -rf src

# Then the sources (the tests are not needed: the stub keeps Cargo.toml's [[test]] valid).
# touch makes cargo rebuild our crate over the stub's artefacts.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin queue-worker \
    && mkdir /out \
    && cp target/release/queue-worker /out/queue-worker \
    && ln -s queue-worker /out/jetstream-queue-worker

# --- runtime -----------------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="queue-worker" \
      org.opencontainers.image.description="Runs OpenFaaS asynchronous invocations out of NATS JetStream" \
      org.opencontainers.image.licenses="MIT"
# jetstream-queue-worker is the name OpenFaaS's charts run; it is the same binary.
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
# 8081: /metrics, /healthz, /readyz. 8080: the front door (queue-worker frontdoor).
EXPOSE 8081 8080
ENTRYPOINT ["/usr/local/bin/queue-worker"]
