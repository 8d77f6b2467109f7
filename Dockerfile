# Conveyor's serving image: the KServe runtime and the Helm chart run it.
#   docker build -t conveyor-serve .
#   docker run -p 8080:8080 -p 8081:8081 -v "$PWD/examples/models:/mnt/models:ro" conveyor-serve
# Models are read from /mnt/models (where KServe's storage initializer puts them); HTTP
# (KServe v2 REST, and Prometheus /metrics) on 8080, gRPC (KServe v2) on 8081.
# See docs/container.md: this image is not built by this repository's CI.

# ---- builder: compiles the C++ core and builds the wheel ---------------------------
FROM python:3.11-slim-bookworm AS builder

# gRPC C++ and protobuf: the native gRPC front end (docs/native-grpc.md).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake ninja-build \
    libgrpc++-dev libprotobuf-dev protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*

# A CPU image: no CUDA toolkit here, so the CUDA parts are left out explicitly.
ENV CONVEYOR_CUDA=OFF \
    CONVEYOR_GRPC=ON \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .
RUN pip wheel . --no-deps --wheel-dir /dist

# ---- runtime: the wheel and its dependencies, run as a non-root user --------------
FROM python:3.11-slim-bookworm AS runtime

# The extras a server needs beside the core (ONNX, native and Python models need none):
# trees (XGBoost, LightGBM, Treelite models) and text (the tokenize step). Add torch for
# model.pt2 packages: --build-arg CONVEYOR_EXTRAS=trees,text,torch (a much larger image).
ARG CONVEYOR_EXTRAS=trees,text

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONVEYOR_DATA_DIR=/var/lib/conveyor

# The shared libraries the native gRPC front end was linked with.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgrpc++1.51 libprotobuf32 \
 && rm -rf /var/lib/apt/lists/*

COPY --from=builder /dist /tmp/dist
RUN wheel="$(ls /tmp/dist/conveyor_serve-*.whl)" \
 && pip install "conveyor-serve[${CONVEYOR_EXTRAS}] @ file://${wheel}" \
 && rm -rf /tmp/dist \
 && conveyor --version

RUN groupadd --system --gid 1000 conveyor \
 && useradd --system --uid 1000 --gid conveyor --home-dir /home/conveyor --create-home --shell /usr/sbin/nologin conveyor \
 && mkdir -p /mnt/models /var/lib/conveyor \
 && chown conveyor:conveyor /var/lib/conveyor

USER 1000:1000
WORKDIR /home/conveyor

EXPOSE 8080 8081

HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/v2/health/live', timeout=2)"]

ENTRYPOINT ["conveyor", "serve"]
CMD ["/mnt/models", "--http-port", "8080", "--grpc-port", "8081", "--host", "0.0.0.0"]
