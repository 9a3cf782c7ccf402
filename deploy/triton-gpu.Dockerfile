# The GPU serving image: NVIDIA's Triton (release 24.12: Python 3.12, TensorRT 10.7.0) plus dlib,
# which the repository's python-backend face_embedder model imports. TensorRT engines load only
# in the TensorRT version that built them: build them with `tensorrt==10.7.0` (deploy/README.md)
# and move both pins together when changing the release.
FROM nvcr.io/nvidia/tritonserver:24.12-py3
RUN pip install --no-cache-dir --break-system-packages dlib-bin
