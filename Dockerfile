# syntax=docker/dockerfile:1
# Static musl binary on distroless/static (nonroot, uid 65532). The binary sits at
# /wsdrain: the entrypoint, and what wrap mode's init container copies (`copy-self`).

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY . .
ENV CC_x86_64_unknown_linux_musl=musl-gcc
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --profile image --target x86_64-unknown-linux-musl --bin wsdrain \
 && cp target/x86_64-unknown-linux-musl/image/wsdrain /wsdrain \
 && /wsdrain --version

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /wsdrain /wsdrain
USER 65532:65532
EXPOSE 19901 8443
ENTRYPOINT ["/wsdrain"]
CMD ["--help"]
