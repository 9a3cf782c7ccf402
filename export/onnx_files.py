"""An ONNX graph on disk: its protobuf and, past protobuf's 2 GB (every full-size SD 1.5 UNet and
ControlNet), its weights as external data.

torch's exporter writes a big graph's weights one file per tensor beside ``model.onnx``, named after
the tensors; two graphs of one model (the role's and its ``_lora`` variant) therefore collide in one
folder. Here a graph's external data is always one file, ``<graph file>.data``, so a graph is two
files that can be copied under any name: :func:`gather_external_data` after the export and
:func:`copy_graph` into a Triton model's version folder. Tensors are streamed one at a time, so
neither loads the weights into memory at once.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo

DATA_SUFFIX = ".data"
ALIGNMENT = 4096  # each tensor's offset, so runtimes can map it


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = list(model.graph.initializer)
    tensors += [
        attribute.t for node in model.graph.node for attribute in node.attribute if attribute.HasField("t")
    ]
    return [t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL]


def data_files(path: Path) -> list[Path]:
    """The external data files the graph at ``path`` reads, in first use order (none when its
    weights are inside the protobuf)."""
    model = onnx.load(str(path), load_external_data=False)
    locations = dict.fromkeys(ExternalDataInfo(t).location for t in _external_tensors(model))
    return [path.parent / location for location in locations]


def copy_graph(source: Path, target: Path) -> None:
    """The graph at ``source`` written at ``target``, its external data (if any) in one file
    ``<target name>.data`` beside it. ``target`` must not be ``source``."""
    if source.resolve() == target.resolve():
        raise ValueError(f"copy_graph: {source} onto itself")
    model = onnx.load(str(source), load_external_data=False)
    tensors = _external_tensors(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not tensors:
        shutil.copyfile(source, target)
        return
    location = target.name + DATA_SUFFIX
    with (target.parent / location).open("wb") as out:
        for tensor in tensors:
            info = ExternalDataInfo(tensor)
            with (source.parent / info.location).open("rb") as data:
                data.seek(info.offset or 0)
                payload = data.read(info.length) if info.length else data.read()
            offset = (out.tell() + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
            out.seek(offset)
            out.write(payload)
            del tensor.external_data[:]
            for key, value in (("location", location), ("offset", offset), ("length", len(payload))):
                tensor.external_data.add(key=key, value=str(value))
    onnx.save(model, str(target))


def gather_external_data(path: Path) -> None:
    """The graph at ``path`` rewritten with its external data in ``<name>.data``; the files it read
    before are removed. Nothing changes for a graph whose weights are in its protobuf."""
    before = data_files(path)
    if not before or before == [path.with_name(path.name + DATA_SUFFIX)]:
        return
    staging = path.parent / f".gather-{path.name}"
    if staging.exists():
        shutil.rmtree(staging)
    copy_graph(path, staging / path.name)
    for old in before:
        old.unlink()
    for part in staging.iterdir():
        part.replace(path.parent / part.name)
    staging.rmdir()
