# CPU image of dysco-serve, built from Debian bookworm packages exactly as `make run` does on a host.
#   docker build -t dysco-serve .
#   docker run --rm dysco-serve
FROM debian:bookworm AS build
WORKDIR /src
COPY scripts/install-deps.sh scripts/install-deps.sh
RUN bash scripts/install-deps.sh && rm -rf /var/lib/apt/lists/*
COPY . .
RUN make model BUILD_DIR=build

FROM debian:bookworm
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      libtorch1.13 libgrpc++1.51 libprotobuf32 libspdlog1.10 libprometheus-cpp-core1.0 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/build/bin /opt/dysco/bin
COPY --from=build /src/build/lib /opt/dysco/lib
COPY --from=build /src/models /opt/dysco/models
ENV LD_LIBRARY_PATH=/opt/dysco/lib
WORKDIR /opt/dysco
CMD ["/opt/dysco/bin/dysco-generate", "--model", "/opt/dysco/models/smollm2-135m-instruct", "--chat", \
     "--prompt", "What is the capital of France? Answer in one sentence.", "--max-new-tokens", "48"]
