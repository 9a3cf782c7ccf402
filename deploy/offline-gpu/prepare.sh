#!/bin/bash
# Packs what the benchmarks need on a GPU host whose Python has PyTorch and the common scientific
# packages (deploy/README.md lists them) but no package index: wheels for the rest, the face
# models' data files as find-only packages (engines/packages.py finds them, never imports them)
# and the generated protobuf modules. Run from the repository root after `make setup`; DIR
# (default .gpu, which .gitignore keeps out of git) travels to the host inside the checkout.
set -euo pipefail
DIR=${1:-.gpu}
PYVER=${PYVER:-3.12}  # the host's Python
SITE_PACKAGES=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
WHEELS=(diffusers==0.42.1 peft==0.21.2 grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1
        grpcio-reflection==1.85.1 grpcio-status==1.85.3 googleapis-common-protos==1.76.0 dlib-bin==20.0.1.post1)
PLATFORMS=()
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
rm -rf "$DIR" && mkdir -p "$DIR/whl" "$DIR/pb"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLATFORMS[@]}" -d "$DIR/whl" "${WHEELS[@]}"
mkdir -p "$DIR/site/face_recognition_models/models" "$DIR/site/facenet_pytorch/data" "$DIR/site/open_clip"
touch "$DIR/site/face_recognition_models/__init__.py" "$DIR/site/facenet_pytorch/__init__.py" \
  "$DIR/site/open_clip/__init__.py"
cp "$SITE_PACKAGES"/face_recognition_models/models/{dlib_face_recognition_resnet_model_v1,shape_predictor_5_face_landmarks}.dat \
  "$DIR/site/face_recognition_models/models/"
cp "$SITE_PACKAGES"/facenet_pytorch/data/{pnet,rnet,onet}.pt "$DIR/site/facenet_pytorch/data/"
cp "$SITE_PACKAGES"/open_clip/bpe_simple_vocab_16e6.txt.gz "$DIR/site/open_clip/"
cp proto/easyphoto/v1/*_pb2*.py "$DIR/pb/"
du -sh "$DIR"
