"""Triton python-backend model that runs an exported role's ONNX graph in onnxruntime (CPU).

Copied by ``easyphoto export --triton`` into ``<repository>/<role>/<version>/model.py`` beside the
role's ``model.onnx``, for Triton builds without the onnxruntime or TensorRT backends (the CPU
``tritonserver`` that nvidia-pytriton ships has only the python backend). Inputs and outputs are
the ones the generated ``config.pbtxt`` declares, which come from the role's description.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(os.environ.get("EASYPHOTO_ORT_THREADS", "0"))
        self.session = ort.InferenceSession(
            os.path.join(folder, "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [spec["name"] for spec in config["input"]]
        self.outputs = [spec["name"] for spec in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                feed = {
                    name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs
                }
                results = self.session.run(self.outputs, feed)
                tensors = [
                    pb_utils.Tensor(name, np.ascontiguousarray(value))
                    for name, value in zip(self.outputs, results, strict=True)
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except Exception as error:  # reported to the client as this request's error
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))))
        return responses
