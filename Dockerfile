# CPU image of dysco-serve, built from Debian bookworm packages exactly as `make run` does on a host.
#   docker build -t dysco-serve .
#   docker run --rm -p 50051:50051 -p 9090:9090 dysco-serve
# The runtime image runs dysco-server: gRPC (dysco.v1.Generation, grpc.health.v1, reflection) on 50051,
# Prometheus metrics at :9090/metrics. Extra flags go after the image name, e.g. `--max-batch 8`, or a YAML
# config: `-v $PWD/deploy/dysco-server.yaml:/etc/dysco/dysco-server.yaml` and `--config /etc/dysco/...`.
FROM debian:bookworm AS build
WORKDIR /src
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN bash scripts/install-deps.sh && rm -rf /var/lib/apt/lists/*
COPY . .
RUN make model BUILD_DIR=build

FROM debian:bookworm
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      libtorch1.13 libgrpc++1.51 libprotobuf32 libspdlog1.10 libprometheus-cpp-core1.0 libcpp-httplib0.11 \
      libyaml-cpp0.7 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/build/bin /opt/dysco/bin
COPY --from=build /src/build/lib /opt/dysco/lib
COPY --from=build /src/models /opt/dysco/models
ENV LD_LIBRARY_PATH=/opt/dysco/lib
WORKDIR /opt/dysco
EXPOSE 50051 9090
# Health: Kubernetes probes the gRPC health service itself (deploy/kubernetes/deployment.yaml: liveness "",
# readiness "dysco.v1.Generation"). Docker has no gRPC probe and the image no grpc client, so its HEALTHCHECK
# only asks whether the process answers on the metrics port (bash's /dev/tcp, no extra packages); the
# start period covers the model load.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD bash -c 'exec 3<>/dev/tcp/127.0.0.1/9090 && printf "GET /metrics HTTP/1.0\r\n\r\n" >&3 && grep -q "^dysco_requests_running" <&3'
# SIGTERM drains: new requests get UNAVAILABLE, running ones finish within --drain-timeout (30 s by default;
# give `docker stop -t 40` the time for it).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/dysco/bin/dysco-server", "--model", "/opt/dysco/models/smollm2-135m-instruct"]
CMD []
