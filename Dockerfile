# dysco-serve's image, one Dockerfile for both variants (docs/operations.md, "Container image"):
#   CPU (default): Debian bookworm, Debian's libtorch 1.13, as `make build` on a host.
#     docker build -t dysco-serve:cpu .
#   CUDA: an NVIDIA CUDA devel image builds -DDYSCO_CUDA=ON against PyPI's torch 2.11 wheel (CUDA 13.0),
#   the CUDA runtime image runs it (needs the NVIDIA container runtime: `docker run --gpus all`, or
#   nvidia.com/gpu in the gpu overlay). Not built on the CPU CI machine (no CUDA base image there).
#     docker build -t dysco-serve:cuda --build-arg DYSCO_CUDA=ON \
#       --build-arg BUILD_IMAGE=nvidia/cuda:13.0.1-devel-ubuntu24.04 \
#       --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04 .
# Both stages are one path, the variant chosen by build arguments (not by named stages per variant): the
# legacy builder builds every stage of a Dockerfile, so a CUDA-only stage would make the CPU build pull a
# CUDA image. scripts/image-test.sh builds the CPU variant from a locally made Debian base and runs it.
#
# The build context needs the exported model package in models/smollm2-135m-instruct (`make model` on the
# host; a real directory, not a symlink: `docker build` does not follow a link out of the context). The
# image serves the copy baked in at /opt/dysco/models/, or any package mounted over it (DYSCO_MODEL=DIR).
# .dockerignore keeps the context to the sources and that package (no build dirs, venvs, caches, .git).
#
# Run (flags from the environment, DYSCO_<FLAG>=value -> --<flag>=value, a mounted
# /etc/dysco/dysco-server.yaml, or arguments after the image name; scripts/docker-entrypoint.sh):
#   docker run --rm -p 127.0.0.1:50051:50051 -p 127.0.0.1:9090:9090 -e DYSCO_MAX_BATCH=8 dysco-serve:cpu
# gRPC (dysco.v1.Generation, grpc.health.v1, reflection) on 50051, Prometheus metrics at :9090/metrics.
ARG BASE_IMAGE=debian:bookworm
ARG BUILD_IMAGE=${BASE_IMAGE}

FROM ${BUILD_IMAGE} AS build
# OFF: the CPU build; ON: the CUDA build (BUILD_IMAGE must then have nvcc at /usr/local/cuda/bin/nvcc).
ARG DYSCO_CUDA=OFF
ARG TORCH_VERSION=2.11.0
ARG CUDA_ARCHITECTURES=90
WORKDIR /src
# Sources only (not the model package, not the other scripts), so that no change outside the build rebuilds.
COPY CMakeLists.txt ./
COPY scripts/image-build.sh scripts/
COPY kernels kernels
COPY core core
COPY proto proto
COPY server server
COPY client client
COPY tools tools
COPY bench bench
RUN DYSCO_CUDA=${DYSCO_CUDA} TORCH_VERSION=${TORCH_VERSION} CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES} \
    OUT=/out bash scripts/image-build.sh

FROM ${BASE_IMAGE}
# Only the runtime shared-library packages: the list the build stage derived from the binaries (ldd),
# installed without recommends. The non-root user is the one the Kubernetes manifests run as (10001).
COPY --from=build /out/runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive xargs -a /tmp/runtime-packages.txt \
         apt-get install -y -q --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb /tmp/runtime-packages.txt \
    && groupadd --gid 10001 dysco \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin dysco
# The model package before the binaries: the larger layer, changed less often.
COPY models/smollm2-135m-instruct /opt/dysco/models/smollm2-135m-instruct
COPY --from=build /out/opt/dysco /opt/dysco
# From the context (mode 0755 from git), not through the build stage: editing it does not recompile.
COPY scripts/docker-entrypoint.sh /opt/dysco/bin/docker-entrypoint.sh
# GOMP_SPINCOUNT=20000: OpenMP's idle threads spin a few tens of microseconds, then sleep: the kernels' parallel
# regions follow each other closely in a decode step (sleeping at once, OMP_WAIT_POLICY=PASSIVE, made decode
# 1.4x slower), and a bounded spin does not take the cores from anything else for long (docs/performance.md
# "Threads on a busy machine"). Overridable with `docker run -e`.
ENV PATH=/opt/dysco/bin:${PATH} \
    LD_LIBRARY_PATH=/opt/dysco/lib:/opt/dysco/torch/lib \
    GOMP_SPINCOUNT=20000
WORKDIR /opt/dysco
USER 10001:10001
EXPOSE 50051 9090
# Kubernetes probes with the same client (deploy/kubernetes/base/deployment.yaml: startup/readiness on
# "dysco.v1.Generation", SERVING once the model is loaded; liveness on ""). Docker's HEALTHCHECK asks the
# same question over plaintext on the default port; with TLS (DYSCO_TLS_CERT) or another port, override it
# (`--health-cmd`) or turn it off (`--no-healthcheck`). The start period covers the model load.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/opt/dysco/bin/dysco-client", "health", "--target", "localhost:50051", \
       "--service", "dysco.v1.Generation", "--timeout-ms", "3000"]
# SIGTERM drains: new requests get UNAVAILABLE, running ones finish within --drain-timeout (30 s by default;
# give `docker stop -t 40` the time for it).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/dysco/bin/docker-entrypoint.sh"]
CMD []
