# syntax=docker/dockerfile:1
# Static musl binary on distroless/static (nonroot, uid 65532). The binary sits at
# /wsdrain: the entrypoint, and what wrap mode's init container copies (`copy-self`).
# It is the slim sidecar: no lab, no echo app. For a demo image with the echo app:
#   docker build --build-arg FEATURES=echo -t wsdrain:dev .
# `wsdrain version` shows the commit given as --build-arg GIT_COMMIT=$(git rev-parse HEAD).

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
ARG FEATURES=""
ARG GIT_COMMIT=""
ENV CC_x86_64_unknown_linux_musl=musl-gcc WSDRAIN_GIT_COMMIT=${GIT_COMMIT}
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --profile image --target x86_64-unknown-linux-musl \
      --no-default-features --features "${FEATURES}" --bin wsdrain \
 && cp target/x86_64-unknown-linux-musl/image/wsdrain /wsdrain \
 && /wsdrain version

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /wsdrain /wsdrain
USER 65532:65532
EXPOSE 19901 8443
ENTRYPOINT ["/wsdrain"]
CMD ["--help"]
