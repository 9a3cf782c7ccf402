"""Triton python-backend model for the CPU Triton build (which has no other backend).

Copied by ``easyphoto export --triton`` into ``<repository>/<role>/<version>/model.py``. It serves
what its version folder holds:

* ``model.onnx``: the role's exported graph, run in onnxruntime;
* or, for a role that takes a LoRA, ``model.lora.onnx`` with ``lora.json`` and ``lora_feed.py``:
  the role's graph with LoRA inputs (``engines/roles/lora_inputs.py``), which serves every row: a
  row names a user's adapter or none (the optional ``adapter`` and ``adapter_weight`` inputs; a
  base row is weight 0). One graph, so one copy of the weights (a full-size UNet's are 3.4 GB).
  The adapters' factors are kept here, next to the session, loaded from
  ``<adapter_dir>/<name>.<target>.npz`` (written by the orchestrator) on first use: a call
  carries names, never factors;
* ``dlib_descriptor.py`` and dlib's ResNet weights: the ``face_embedder`` role (dlib has no graph;
  the same module computes the role in process, :mod:`engines.faces.dlib_descriptor`).

Every request of one ``execute`` whose inputs can share a call is concatenated along the batch
axis and run as one call of the session: the dynamic batcher's merged requests, several users'
rows among them, are one model run. A request that cannot run (an adapter it names is missing)
fails alone.
"""

import importlib
import json
import os
import sys
from collections import OrderedDict

import numpy as np
import triton_python_backend_utils as pb_utils

ADAPTER_INPUTS = ("adapter", "adapter_weight")
# Adapters kept next to the session, least recently used out first past this many bytes.
ADAPTER_CACHE_BYTES = int(os.environ.get("EASYPHOTO_ADAPTER_CACHE_BYTES", str(2 << 30)))


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("EASYPHOTO_ORT_THREADS", "0"))
    # No memory arena: it keeps every run's peak activations and grows with each run. A full-size
    # ControlNet (1.45 GB of weights, batch 2 at 512 px) held 1.9 GB loaded, 4.1 GB after one run
    # and 6.4 GB after two with it, 1.85 GB after each without it, at the same speed (3.6 s).
    options.enable_cpu_mem_arena = os.environ.get("EASYPHOTO_ORT_ARENA", "0") == "1"
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _onnx_runner(folder, outputs):
    session = _session(os.path.join(folder, "model.onnx"))
    return lambda feed: session.run(outputs, feed)


def _dlib_runner(folder, inputs):
    sys.path.insert(0, folder)
    descriptor = importlib.import_module("dlib_descriptor")
    net = descriptor.load_descriptor(os.path.join(folder, descriptor.RESNET_FILE))
    return lambda feed: [descriptor.describe_chips(net, feed[inputs[0]])]


class _LoraRunner:
    """The graph with LoRA inputs and the adapters' factors beside it."""

    def __init__(self, folder, outputs, adapter_dir):
        sys.path.insert(0, folder)
        self.feed = importlib.import_module("lora_feed")
        with open(os.path.join(folder, "lora.json")) as handle:
            spec = json.load(handle)
        self.target, self.layers = spec["target"], spec["layers"]
        self.shapes = [tuple(shape) for shape in spec["shapes"]]
        self.session = _session(os.path.join(folder, "model.lora.onnx"))
        self.outputs = outputs
        self.adapter_dir = adapter_dir
        self.cache = OrderedDict()

    def factors(self, name):
        """The adapter's factors, loaded on first use (FileNotFoundError naming it otherwise)."""
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name][0]
        path = os.path.join(self.adapter_dir, self.feed.factors_file(name, self.target))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"adapter {name!r} is not in {self.adapter_dir} (the orchestrator writes it)"
            )
        factors = self.feed.load_factors(path, self.layers)
        size = sum(down.nbytes + up.nbytes for pair in factors if pair is not None for down, up in [pair])
        self.cache[name] = (factors, size)
        while sum(entry[1] for entry in self.cache.values()) > ADAPTER_CACHE_BYTES and len(self.cache) > 1:
            self.cache.popitem(last=False)
        return factors

    def run(self, feed, rows):
        factors = {name: self.factors(name) for name, weight in rows if name and weight != 0}
        lora = self.feed.lora_feed(rows, factors, self.shapes)
        return self.session.run(self.outputs, {**feed, **lora})


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.inputs = [spec["name"] for spec in config["input"] if spec["name"] not in ADAPTER_INPUTS]
        self.outputs = [spec["name"] for spec in config["output"]]
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.lora = None
        if os.path.isfile(os.path.join(folder, "model.lora.onnx")):
            parameters = config.get("parameters", {})
            adapter_dir = os.environ.get("EASYPHOTO_ADAPTER_DIR") or parameters["adapter_dir"]["string_value"]
            self.lora = _LoraRunner(folder, self.outputs, adapter_dir)
            self.run = self.lora.run
        else:
            runner = (
                _onnx_runner(folder, self.outputs)
                if os.path.isfile(os.path.join(folder, "model.onnx"))
                else _dlib_runner(folder, self.inputs)
            )
            self.run = lambda feed, rows: runner(feed)

    def execute(self, requests):
        responses = [None] * len(requests)
        groups: dict[tuple, list] = {}
        for position, request in enumerate(requests):
            try:
                feed = {
                    name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs
                }
                rows = self._rows(request, len(next(iter(feed.values()))) if self.batched else 1)
                named = [name for name, weight in rows if name and weight != 0]
                if named and self.lora is not None:
                    for name in named:
                        self.lora.factors(name)  # a missing adapter fails this request only
                shapes = tuple((name, value.shape[1:], value.dtype.str) for name, value in feed.items())
                # Batched models share calls by shapes; unbatched ones run each request alone.
                key = (shapes, None if self.batched else position)
                groups.setdefault(key, []).append((position, feed, rows))
            except Exception as error:  # reported to the client as this request's error
                responses[position] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
        for members in groups.values():
            self._run_group(members, responses)
        return responses

    def _rows(self, request, count):
        """(adapter name, weight) per row; none given: the base model."""
        names = pb_utils.get_input_tensor_by_name(request, "adapter")
        weights = pb_utils.get_input_tensor_by_name(request, "adapter_weight")
        if names is None or self.lora is None:
            return [("", 0.0)] * count
        decoded = [n.decode() if isinstance(n, bytes) else str(n) for n in names.as_numpy().reshape(-1)]
        values = weights.as_numpy().reshape(-1) if weights is not None else np.ones(len(decoded), np.float32)
        return list(zip(decoded, (float(w) for w in values), strict=True))

    def _run_group(self, members, responses):
        """One session run for every member (their rows concatenated), then each its own rows."""
        try:
            if self.batched:
                feed = {name: np.concatenate([m[1][name] for m in members]) for name in self.inputs}
            else:
                feed = members[0][1]
            rows = [row for m in members for row in m[2]]
            outputs = self.run(feed, rows)
            start = 0
            for position, _, member_rows in members:
                count = len(member_rows) if self.batched else None
                parts = [value[start : start + count] if count is not None else value for value in outputs]
                start += count or 0
                tensors = [
                    pb_utils.Tensor(n, np.ascontiguousarray(v))
                    for n, v in zip(self.outputs, parts, strict=True)
                ]
                responses[position] = pb_utils.InferenceResponse(output_tensors=tensors)
        except Exception as error:  # the whole group failed: each of its requests says why
            for position, _, _ in members:
                responses[position] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
