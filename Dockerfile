# tiergate in a container: built with the Rust toolchain this repository is tested with, run as a
# non-root user on a distroless base (glibc, no shell). SQLite is compiled into the binary and
# TLS roots are built in (rustls, webpki-roots), so the final image needs nothing else.
# No image is built in this repository's CI (its machines cannot reach a registry); the
# commands below are the whole of it.
#
#   docker build -t tiergate .
#   docker run -p 8080:8080 -v tiergate-data:/var/lib/tiergate \
#     -e TIERGATE_UPSTREAM=https://api.mistral.ai -e TIERGATE_UPSTREAM_API_KEY=... \
#     -e TIERGATE_ADMIN_TOKEN=... tiergate

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin tiergate \
    && mkdir -p /out/data \
    && cp target/release/tiergate /out/tiergate

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/tiergate /usr/local/bin/tiergate
# The data directory (SQLite), owned by the image's non-root user (65532).
COPY --from=build --chown=65532:65532 /out/data /var/lib/tiergate
COPY deploy/container.toml /etc/tiergate/tiergate.toml
USER 65532:65532
# The listen address and the database come from that file, not from variables, which would
# override a file mounted in its place (or named by TIERGATE_CONFIG) without a word.
ENV TIERGATE_CONFIG=/etc/tiergate/tiergate.toml
VOLUME ["/var/lib/tiergate"]
EXPOSE 8080
# SIGTERM stops it gracefully (requests in flight finish, the ledger is flushed).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tiergate"]
CMD ["serve"]
