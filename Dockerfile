# syntax=docker/dockerfile:1
# One image with Jetcall's three services and the `jetcall` CLI; compose.yaml runs one of them
# per container with `command` (gateway, generator, callback, or `jetcall topology`).
#   docker build -t jetcall:local .      (docker compose build does the same)
# Configuration comes from the environment at run time; nothing secret is in the image.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target directory are build caches, so a rebuild compiles only what changed.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
        --bin gateway --bin generator --bin callback --bin jetcall \
 && install -D --mode=0755 --target-directory=/out \
        target/release/gateway target/release/generator target/release/callback \
        target/release/jetcall

# The healthchecks' HTTP client: busybox's static wget, the only tool added to the runtime.
FROM busybox:1.37-musl AS wget

# glibc, libgcc and CA certificates, no shell, user `nonroot` (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=wget /bin/busybox /usr/local/bin/wget
COPY --from=build /out/ /usr/local/bin/
USER nonroot
# gateway.listen, generator.listen and callback.listen as compose.yaml sets them.
EXPOSE 8080 8081 8082
CMD ["gateway"]
