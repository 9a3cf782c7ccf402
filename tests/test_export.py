"""ONNX export of every role from its description, checked against PyTorch in onnxruntime."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
import torch

from easyphoto.diffusion.catalogue import role_catalogue
from easyphoto.engines.faces.models import default_face_models
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.roles.diffusion import describe_roles
from easyphoto.export.onnx_export import export_all, export_role, initializer_names


@pytest.fixture(scope="module")
def exported(tiny: ModelFamily, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export")
    catalogue = role_catalogue(tiny, default_face_models(), fused=False)
    results = {
        r.role: r for r in export_all(catalogue, out, tiny, lora_graphs=False)
    }  # test_lora_graphs has those
    return out, results


def test_every_torch_role_exports_and_matches_pytorch(exported: tuple[Path, dict]) -> None:
    _, results = exported
    expected = {"text_encoder", "vae_encoder", "vae_decoder", "unet", "face_pnet", "face_rnet", "face_onet"}
    expected |= {f"controlnet_{k}" for k in ("canny", "openpose", "color", "tile")}
    assert set(results) == expected  # face_embedder is dlib: served by its own runtime
    for result in results.values():
        assert result.ok, (result.role, result.max_abs_diff, result.fp16_rel_diff)


def test_fp16_graphs_where_the_role_allows_with_fp32_io_and_the_same_names(
    exported: tuple[Path, dict], tiny: ModelFamily
) -> None:
    out, results = exported
    roles = {**describe_roles(tiny), **default_face_models().roles}
    with_fp16 = {name for name, result in results.items() if result.fp16_path is not None}
    assert with_fp16 == {name for name in results if roles[name].fp16}
    assert "unet" in with_fp16 and "face_pnet" not in with_fp16
    for name in ("unet", "controlnet_canny", "text_encoder"):
        fp32, fp16 = onnx.load(str(out / name / "model.onnx")), onnx.load(str(results[name].fp16_path))
        halves = [i for i in fp16.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
        assert len(halves) > 0.9 * len(fp32.graph.initializer), name
        assert {i.name for i in fp16.graph.initializer} >= {i.name for i in fp32.graph.initializer}
        assert [i.type.tensor_type.elem_type for i in fp16.graph.input] == [
            i.type.tensor_type.elem_type for i in fp32.graph.input
        ]
        assert 0 < results[name].fp16_rel_diff <= 2e-2, (name, results[name].fp16_rel_diff)


def test_graph_names_and_dynamic_axes_follow_the_description(
    exported: tuple[Path, dict], tiny: ModelFamily
) -> None:
    out, _ = exported
    unet = describe_roles(tiny)["unet"]
    model = onnx.load(str(out / "unet" / "model.onnx"))
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert list(inputs) == [s.name for s in unet.inputs]
    assert inputs["sample"] == ["batch", 4, "latent_height", "latent_width"]
    assert inputs["mid_block_res"] == ["batch", 64, "latent_height/8", "latent_width/8"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["roles"]["unet"]["onnx"] == "unet/model.onnx"
    assert manifest["roles"]["unet"]["onnx_fp16"] == "unet/model.fp16.onnx"
    assert manifest["roles"]["face_pnet"]["onnx_fp16"] is None


def test_parameter_names_survive_for_lora_refit(exported: tuple[Path, dict]) -> None:
    out, _ = exported
    names = initializer_names(out / "unet" / "model.onnx")
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight" in names
    assert "unet.up_blocks.3.attentions.2.proj_out.weight" in names
    names = initializer_names(out / "text_encoder" / "model.onnx")
    assert any(n.endswith("self_attn.q_proj.weight") for n in names)


def test_unchanged_roles_are_skipped_and_changed_weights_reexported(
    exported: tuple[Path, dict], tiny: ModelFamily
) -> None:
    out, results = exported
    roles = describe_roles(tiny)
    for name in ("text_encoder", "unet"):  # reported as the export that wrote it did
        kept = export_role(roles[name], out)
        assert kept.skipped
        assert replace(kept, seconds=0.0, skipped=False) == replace(results[name], seconds=0.0)
    original = tiny.text_encoder.get_input_embeddings().weight.detach().clone()
    try:
        with torch.no_grad():
            tiny.text_encoder.get_input_embeddings().weight[0] += 1.0
        result = export_role(roles["text_encoder"], out)
        assert not result.skipped and result.ok
    finally:
        with torch.no_grad():
            tiny.text_encoder.get_input_embeddings().weight.copy_(original)


def test_the_export_key_follows_the_description_and_the_exporter(
    tiny: ModelFamily, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from easyphoto.export import onnx_export

    text_encoder = describe_roles(tiny)["text_encoder"]
    module = text_encoder.build_module()
    key = onnx_export.export_key(text_encoder, module)
    assert onnx_export.export_key(text_encoder, module) == key
    batch = text_encoder.axes["batch"]
    wider = replace(text_encoder, axes={**text_encoder.axes, "batch": replace(batch, max=batch.max + 1)})
    assert onnx_export.export_key(wider, module) != key  # a new profile: the graph is written again
    monkeypatch.setattr(onnx_export, "EXPORTER_VERSION", onnx_export.EXPORTER_VERSION + "-next")
    assert onnx_export.export_key(text_encoder, module) != key


def test_tensorrt_plans_follow_the_descriptions(exported: tuple[Path, dict], tiny: ModelFamily) -> None:
    from easyphoto.export.tensorrt_plan import read_plans

    out, results = exported
    plans = {plan.role: plan for plan in read_plans(out)}
    assert set(plans) == set(results)
    roles = describe_roles(tiny)
    unet, plan = roles["unet"], plans["unet"]
    assert list(plan.profile) == [spec.name for spec in unet.inputs]
    for point in ("min", "opt", "max"):
        shapes = unet.shapes(point)
        assert all(plan.profile[name][point] == list(shapes[name]) for name in plan.profile)
    assert plan.profile["sample"]["max"][0] == unet.axes["batch"].max
    assert plan.refittable and plan.fp16 and plan.engine == "unet/model.plan"
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_k.weight" in plan.weights
    roles.update(default_face_models().roles)
    assert all(plan.fp16 == roles[name].fp16 for name, plan in plans.items())  # where the role allows it
    assert not all(plan.fp16 for plan in plans.values())  # face roles stay fp32


def test_triton_repository_configs_come_from_the_descriptions(
    exported: tuple[Path, dict], tiny: ModelFamily, tmp_path: Path
) -> None:
    from easyphoto.export.triton_repository import write_repository

    out, results = exported
    roles = describe_roles(tiny)
    roles.update(default_face_models().roles)
    models = write_repository(out, roles, tmp_path / "cpu")
    assert set(models) == set(results) | {"face_embedder"}  # dlib: a python model, not a graph
    dlib_model = tmp_path / "cpu" / "face_embedder"
    assert {p.name for p in (dlib_model / "1").iterdir()} == {
        "model.py", "dlib_descriptor.py", "dlib_face_recognition_resnet_model_v1.dat",
    }  # fmt: skip
    from easyphoto.export.triton_repository import ServingSettings, config_pbtxt

    on_gpu = config_pbtxt(roles["face_embedder"], "gpu", ServingSettings(), python=True)
    assert 'backend: "python"' in on_gpu and "KIND_CPU" in on_gpu and "max_batch_size: 64" in on_gpu
    unet = (tmp_path / "cpu" / "unet" / "config.pbtxt").read_text()
    assert 'backend: "python"' in unet and "max_batch_size: 16" in unet and "dynamic_batching" in unet
    assert 'name: "sample"\n    data_type: TYPE_FP32\n    dims: [ 4, -1, -1 ]' in unet
    assert 'name: "timestep"\n    data_type: TYPE_FP32\n    dims: [ 1 ]\n    reshape: { shape: [ ] }' in unet
    assert (tmp_path / "cpu" / "unet" / "1" / "model.onnx").is_file()
    assert "rate_limiter" not in unet  # only under a weights threshold, which the default has not
    weights_mb = (out / "unet" / "model.onnx").stat().st_size / 1e6  # the tiny graph holds its weights
    limited = tmp_path / "limited"
    write_repository(out, roles, limited, settings=ServingSettings(rate_limit_mb=weights_mb * 0.99))
    assert (
        'rate_limiter { resources [ { name: "memory" count: 1 } ] }'
        in (limited / "unet/config.pbtxt").read_text()
    )
    assert "rate_limiter" not in (limited / "face_pnet" / "config.pbtxt").read_text()  # a light model
    assert "TritonPythonModel" in (tmp_path / "cpu" / "unet" / "1" / "model.py").read_text()
    with pytest.raises(FileNotFoundError, match="GPU host"):
        write_repository(out, roles, tmp_path / "gpu", target="gpu")
    (out / "unet" / "model.plan").write_bytes(b"engine")  # what the GPU host's build leaves
    try:
        gpu = config_pbtxt(roles["unet"], "gpu", ServingSettings(instances=2))
        assert 'platform: "tensorrt_plan"' in gpu and "count: 2 kind: KIND_GPU" in gpu
    finally:
        (out / "unet" / "model.plan").unlink()


def test_the_engine_build_is_configured_from_the_plan(exported: tuple[Path, dict]) -> None:
    """The polygraphy loader the GPU host runs (TensorRT is imported only when it does)."""
    from easyphoto.export.tensorrt_plan import engine_loader, read_plans

    out, _ = exported
    plan = next(plan for plan in read_plans(out) if plan.role == "unet")
    loader = engine_loader(plan, out)
    config = loader._config  # polygraphy's CreateConfig, as EngineFromNetwork keeps it
    assert config.fp16 and config.refittable
    (profile,) = config.profiles
    assert list(profile) == list(plan.profile)
    for name, shapes in plan.profile.items():
        assert (list(profile[name].min), list(profile[name].opt), list(profile[name].max)) == (
            shapes["min"], shapes["opt"], shapes["max"],
        )  # fmt: skip
    assert loader.timing_cache_path == str(out / plan.timing_cache)
