# The orchestrator and trainer image (`easyphoto serve`, `easyphoto trainer`). Build from the
# repository root: docker build -f deploy/easyphoto.Dockerfile -t easyphoto .
# TORCH_INDEX picks the wheel: the CPU build by default, a CUDA index for GPU trainers, e.g.
# --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir torch==2.13.0 --index-url "$TORCH_INDEX" \
    && pip install --no-cache-dir -e ".[dev]" \
    && pip install --no-cache-dir --no-deps tritonclient==2.73.0 \
    && python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto \
       proto/easyphoto/v1/*.proto
ENV EASYPHOTO_DATA=/data EASYPHOTO_CACHE=/cache
USER 1000:1000
ENTRYPOINT ["easyphoto"]
