"""Triton python-backend model for the CPU Triton build (which has no other backend).

Copied by ``easyphoto export --triton`` into ``<repository>/<role>/<version>/model.py``. It serves
what its version folder holds:

* ``model.onnx``: the role's exported graph, run in onnxruntime;
* ``dlib_descriptor.py`` and dlib's ResNet weights: the ``face_embedder`` role (dlib has no graph;
  the same module computes the role in process, :mod:`engines.faces.dlib_descriptor`).

Inputs and outputs are the ones the generated ``config.pbtxt`` declares, which come from the
role's description.
"""

import importlib
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


def _onnx_runner(folder, outputs):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ.get("EASYPHOTO_ORT_THREADS", "0"))
    session = ort.InferenceSession(
        os.path.join(folder, "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    return lambda feed: session.run(outputs, feed)


def _dlib_runner(folder, inputs):
    sys.path.insert(0, folder)
    descriptor = importlib.import_module("dlib_descriptor")
    net = descriptor.load_descriptor(os.path.join(folder, descriptor.RESNET_FILE))
    return lambda feed: [descriptor.describe_chips(net, feed[inputs[0]])]


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.inputs = [spec["name"] for spec in config["input"]]
        self.outputs = [spec["name"] for spec in config["output"]]
        if os.path.isfile(os.path.join(folder, "model.onnx")):
            self.run = _onnx_runner(folder, self.outputs)
        else:
            self.run = _dlib_runner(folder, self.inputs)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feed = {
                    name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs
                }
                tensors = [
                    pb_utils.Tensor(name, np.ascontiguousarray(value))
                    for name, value in zip(self.outputs, self.run(feed), strict=True)
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as error:  # reported to the client as this request's error
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))))
        return responses
