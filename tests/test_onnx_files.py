"""Graphs past 2 GB keep their weights outside the protobuf: gathered into one file after the
export, and copied under another name beside a second graph with the same tensor names (a role and
its ``_lora`` variant in one Triton version folder). Small graphs stand in for them here, written
with one file per tensor the way torch's exporter writes a big one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from easyphoto.export.onnx_files import ALIGNMENT, DATA_SUFFIX, copy_graph, data_files, gather_external_data


def _graph(folder: Path, seed: int) -> Path:
    """y = x @ weight + bias, each weight tensor in its own file named after it."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((8, 5)).astype(np.float32), "unet.weight")
    bias = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "unet.bias")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "unet.weight"], ["h"]),
            helper.make_node("Add", ["h", "unet.bias"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0
    )
    return path


def _run(path: Path) -> np.ndarray:
    x = np.arange(16, dtype=np.float32).reshape(2, 8) / 10
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_a_graphs_scattered_weights_are_gathered_into_one_file(tmp_path: Path) -> None:
    path = _graph(tmp_path / "unet", seed=0)
    assert len(data_files(path)) == 2  # the exporter's layout: a file per tensor
    before = _run(path)
    gather_external_data(path)
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["model.onnx", "model.onnx" + DATA_SUFFIX]
    assert data_files(path) == [path.with_name("model.onnx.data")]
    np.testing.assert_array_equal(_run(path), before)
    model = onnx.load(str(path), load_external_data=False)
    offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
    assert len(offsets) == 2 and all(o % ALIGNMENT == 0 for o in offsets)
    gather_external_data(path)  # already gathered: unchanged
    np.testing.assert_array_equal(_run(path), before)


def test_two_graphs_with_the_same_tensor_names_copy_into_one_folder(tmp_path: Path) -> None:
    base, lora = _graph(tmp_path / "unet", seed=0), _graph(tmp_path / "unet_lora", seed=1)
    version = tmp_path / "repository" / "unet" / "1"
    copy_graph(base, version / "model.onnx")
    copy_graph(lora, version / "model.lora.onnx")
    assert {p.name for p in version.iterdir()} == {
        "model.onnx", "model.onnx.data", "model.lora.onnx", "model.lora.onnx.data",
    }  # fmt: skip
    np.testing.assert_array_equal(_run(version / "model.onnx"), _run(base))
    np.testing.assert_array_equal(_run(version / "model.lora.onnx"), _run(lora))
    assert not np.array_equal(_run(base), _run(lora))


def test_a_graph_without_external_data_is_copied_as_it_is(tmp_path: Path) -> None:
    path = _graph(tmp_path / "a", seed=0)
    inside = onnx.load(str(path))  # the weights read back into the protobuf
    onnx.save_model(inside, str(tmp_path / "inside.onnx"))
    copy_graph(tmp_path / "inside.onnx", tmp_path / "b" / "model.onnx")
    assert (tmp_path / "b" / "model.onnx").read_bytes() == (tmp_path / "inside.onnx").read_bytes()
    assert data_files(tmp_path / "b" / "model.onnx") == []
