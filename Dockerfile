# The datastore-operator image: one binary, /datastore, that is the controller
# (`datastore controller`, the Helm chart's Deployment), the agent of the download and upload
# containers the controller creates, and the CLI. Nothing else is in it: no shell, no package
# manager; the base image brings glibc, libgcc and the CA certificates for TLS to storage.
#
#   docker build -t ghcr.io/datastore-operator/datastore:0.1.0 .
#
# The build stage runs on the platform being built (`docker buildx --platform linux/arm64`
# works under emulation). Both stages are Debian 12, so the binary finds the glibc it was
# linked against.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin datastore \
 && cp target/release/datastore /datastore

# distroless cc: glibc, libgcc, CA certificates, /etc/passwd with nonroot (65532); no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
# Agent containers run `/datastore` by this path (build::IMAGE_BINARY; tests/image.rs checks
# the two agree): distroless has no PATH entry for `/`.
COPY --from=build /datastore /datastore
# The user every pod of the chart and of the controller's Jobs runs as (runAsUser 65532).
USER 65532:65532
ENTRYPOINT ["/datastore"]
