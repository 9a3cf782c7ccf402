# easyphoto-serve: `make demo` and `make test` work on a fresh machine with Python 3.11.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.easyphoto-setup
PACKAGES := cli engines server trainer export rpc imaging users diffusion fixtures
PROTOS := $(wildcard proto/easyphoto/v1/*.proto)
PROTO_OUT := $(PROTOS:.proto=_pb2.py)
PORT ?= 50051
TRAINER_PORT ?= 50052
BACKEND ?= torch
MODELS ?= tiny
EXPORT_DIR ?= build/export
TRITON_VENV ?= .venv-triton
# Bump the stamp's suffix when the recipe changes, so existing environments are brought up to date.
TRITON_STAMP := $(TRITON_VENV)/.easyphoto-triton-2
TRITON_REPO ?= build/triton-repo
TRITON_HTTP_PORT ?= 8000
TRITON_GRPC_PORT ?= 8001
TRITON_METRICS_PORT ?= 8002
SOAK_MINUTES ?= 10
# pytest-xdist workers of `make test` (tests/conftest.py orders the files for them); 0: in process.
TEST_WORKERS ?= 2

.PHONY: setup proto demo test lint bench bench-quick soak serve trainer export triton-setup triton clean

# torch==2.13.0 is the CPU wheel; an unpinned torch pulls gigabytes of CUDA packages.
# open-clip-torch ships OpenAI's CLIP BPE (the SD 1.5 tokenizer) and facenet-pytorch the MTCNN
# weights; --no-deps keeps torchvision (and facenet's old torch pin) out.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps open-clip-torch==3.3.0 facenet-pytorch==2.6.0
	# tritonclient's grpc extra pins protobuf<7; its bundled stubs work with the protobuf 7 we need.
	$(BIN)/python -m pip install -q --no-deps tritonclient==2.73.0
	touch $(STAMP)

# The CPU tritonserver (python backend only) from nvidia-pytriton, in its own venv: its python stub
# needs numpy<2 (export/triton_server.py explains the layout).
$(TRITON_STAMP):
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q nvidia-pytriton==0.7.0 onnxruntime 'numpy<2'
	# dlib for the face_embedder model (dlib has no graph: a python-backend model over it).
	$(TRITON_VENV)/bin/python -m pip install -q 'dlib-bin>=19.24'
	# The real perf_analyzer binary ships in this tritonclient wheel (the client library is unused here).
	$(TRITON_VENV)/bin/python -m pip install -q --no-deps tritonclient==2.51.0
	touch $(TRITON_STAMP)

triton-setup: $(TRITON_STAMP)

setup: $(STAMP) proto

proto: $(PROTO_OUT)

proto/easyphoto/v1/%_pb2.py: proto/easyphoto/v1/%.proto $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto --grpc_python_out=proto $<

demo: setup
	$(BIN)/easyphoto demo --out demo-out

test: setup triton-setup
	@set +e; $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests collected: failing on purpose"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check $(PACKAGES) tests
	$(BIN)/ruff format --check $(PACKAGES) tests
	$(BIN)/python tests/typecheck.py

bench: setup triton-setup
	$(BIN)/easyphoto bench --out docs/benchmarks.md

bench-quick: setup triton-setup
	$(BIN)/easyphoto bench --only harness --quick --out docs/benchmarks.md

# Both services under load for SOAK_MINUTES (not part of `make test`); fails on any error or leak.
soak: setup
	$(BIN)/easyphoto soak --minutes $(SOAK_MINUTES) --doc docs/benchmarks.md

# BACKEND=triton: against `make triton` on this host (TRITON_GRPC_PORT); TRITON_SHM=system|cuda to
# send large inputs through shared memory.
TRITON_SHM ?= none
serve: setup
	$(BIN)/easyphoto serve --port $(PORT) --backend $(BACKEND) --models $(MODELS) \
		--triton-url 127.0.0.1:$(TRITON_GRPC_PORT) --triton-shared-memory $(TRITON_SHM) --export-dir $(EXPORT_DIR)

trainer: setup
	$(BIN)/easyphoto trainer --port $(TRAINER_PORT) --models $(MODELS)

export: setup
	$(BIN)/easyphoto export --models $(MODELS) --out $(EXPORT_DIR) --fused --triton $(TRITON_REPO)

# Exports (skipping unchanged roles) and serves the repository on loopback until interrupted.
triton: export triton-setup
	$(BIN)/easyphoto triton --repository $(TRITON_REPO) --venv $(TRITON_VENV) \
		--http-port $(TRITON_HTTP_PORT) --grpc-port $(TRITON_GRPC_PORT) --metrics-port $(TRITON_METRICS_PORT)

clean:
	rm -rf build demo-out $(TRITON_VENV) proto/easyphoto/v1/*_pb2*.py proto/easyphoto/v1/*_pb2*.pyi .pytest_cache .mypy_cache .ruff_cache
