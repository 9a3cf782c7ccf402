"""Templates from text: the tiny seeded SDXL family, its roles, and the text-to-image pass, which
equals diffusers' StableDiffusionXLPipeline at the same seed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTokenizer

from easyphoto.diffusion.catalogue import role_catalogue
from easyphoto.diffusion.schedulers import make_scheduler
from easyphoto.diffusion.text_to_image import TextToImage, run_text_to_image
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.backends.triton_backend import TritonBackend
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.sdxl import (
    SdxlFacts,
    SdxlFamily,
    SdxlLoadError,
    load_sdxl_family,
    load_sdxl_single_file,
    resolve_sdxl_family,
    single_file_config_dir,
    tiny_sdxl_family,
)
from easyphoto.engines.roles.manifest import EngineManifest
from easyphoto.engines.roles.sdxl import TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER
from easyphoto.export.onnx_export import export_all
from easyphoto.export.triton_repository import write_repository
from easyphoto.export.triton_server import TritonInstall, free_ports, start_server
from easyphoto.fixtures.checkpoints import save_sdxl_single_file
from easyphoto.fixtures.photos import sample_photo
from easyphoto.imaging.codec import decode_image, from_model
from easyphoto.rpc.errors import ModelMissing
from easyphoto.rpc.wire import error_details
from easyphoto.server.app import EngineHolder, ServerConfig, build_app
from easyphoto.server.options import TemplateOptions
from easyphoto.server.templates import TemplatePainter
from easyphoto.v1 import generator_pb2, generator_pb2_grpc


@pytest.fixture(scope="module")
def sdxl(cache_dir: Path) -> SdxlFamily:
    return tiny_sdxl_family(cache_dir)


@pytest.fixture(scope="module")
def backend(sdxl: SdxlFamily) -> TorchBackend:
    return TorchBackend(None, "cpu", sdxl=sdxl)


def _facts(sdxl: SdxlFamily) -> SdxlFacts:
    return SdxlFacts.of(sdxl)


def _pipeline(sdxl: SdxlFamily, scheduler: str) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline(
        vae=sdxl.vae, text_encoder=sdxl.text_encoder, text_encoder_2=sdxl.text_encoder_2,
        tokenizer=sdxl.tokenizer, tokenizer_2=sdxl.tokenizer_2, unet=sdxl.unet,
        scheduler=make_scheduler(scheduler, sdxl.scheduler_config),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    ("scheduler", "negative", "guidance"),
    [("dpmpp_2m_sde_karras", "", 7.0), ("euler_a", "blurry, cartoon", 5.0), ("ddim", "", 1.0)],
)
def test_the_text_to_image_pass_equals_diffusers_sdxl_pipeline(
    sdxl: SdxlFamily, backend: TorchBackend, scheduler: str, negative: str, guidance: float
) -> None:
    settings = {"height": 128, "width": 64, "num_inference_steps": 6, "guidance_scale": guidance}
    theirs = _pipeline(sdxl, scheduler)(
        "a portrait photo of a person", negative_prompt=negative or None, output_type="pt",
        generator=torch.Generator().manual_seed(3), num_images_per_prompt=2, **settings,
    ).images  # fmt: skip
    request = TextToImage(
        "a portrait photo of a person", negative, width=64, height=128, steps=6, guidance_scale=guidance,
        scheduler=scheduler, images=2, generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    ours = (run_text_to_image(backend, _facts(sdxl), request) / 2 + 0.5).clamp(0, 1)
    assert ours.shape == theirs.shape == (2, 3, 128, 64)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_the_sdxl_roles_bind_their_own_shapes(backend: TorchBackend, sdxl: SdxlFamily) -> None:
    unet = backend.roles[UNET]
    values = unet.bind({name: shape for name, shape in unet.shapes("min").items() if name != "noise_pred"})
    assert values["latent_height"] == sdxl.image_sizes[0] // sdxl.vae_scale_factor
    text = backend.infer(TEXT_ENCODER_2, backend.roles[TEXT_ENCODER_2].sample_inputs("opt"))
    assert text["text_embeds"].shape == (2, int(sdxl.text_encoder_2.config.projection_dim))
    assert backend.roles[VAE_DECODER].fp16 is False  # SDXL's VAE asks for fp32 (force_upcast)


def test_a_folder_that_is_not_sdxl_is_refused_saying_why(tmp_path: Path, tiny: ModelFamily) -> None:
    with pytest.raises(SdxlLoadError, match="is not a folder"):
        load_sdxl_family(tmp_path / "absent")
    (tmp_path / "half").mkdir()
    with pytest.raises(SdxlLoadError, match="not a complete SDXL diffusers folder"):
        load_sdxl_family(tmp_path / "half")
    with pytest.raises(SdxlLoadError, match="text_encoder_2"):  # an SD 1.5 folder
        load_sdxl_family(Path(tiny.source))


@pytest.fixture(scope="module")
def sdxl_server(alice_data: Path) -> Iterator[tuple[generator_pb2_grpc.GeneratorStub, EngineHolder]]:
    """An orchestrator with the tiny SDXL model for templates from text, serving "alice"."""
    app, holder = build_app(ServerConfig(port=0, data=alice_data, sdxl="tiny-sdxl"))
    app.start()
    holder.load()
    app.set_serving(True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield generator_pb2_grpc.GeneratorStub(channel), holder
    finally:
        app.stop(0)


def _from_text(**fields: object) -> generator_pb2.GenerateRequest:
    request = generator_pb2.GenerateRequest(seed=11, **fields)  # type: ignore[arg-type]
    request.template_from_text.prompt = "a photo of a woman in a garden"
    request.template_from_text.width, request.template_from_text.height = 64, 128
    request.template_from_text.steps = 3
    for name in ("first_pass", "second_pass"):
        getattr(request, name).steps, getattr(request, name).strength = 4, 0.5
    return request


def test_a_template_painted_from_text_is_what_the_sdxl_pass_paints(
    sdxl_server: tuple[generator_pb2_grpc.GeneratorStub, EngineHolder], sdxl: SdxlFamily
) -> None:
    orchestrator = sdxl_server[1].get()
    options = TemplateOptions("a photo of a woman in a garden", width=64, height=128, steps=3)
    seen: list[tuple[str, int, int]] = []
    template = orchestrator.paint_template(
        options, 11, lambda p: seen.append((p.stage, p.step, p.total_steps))
    )
    assert seen == [("template_from_text", step, 3) for step in (1, 2, 3)]
    request = TextToImage(
        options.prompt, width=64, height=128, steps=3, generator=torch.Generator().manual_seed(11)
    )
    expected = from_model(run_text_to_image(TorchBackend(None, "cpu", sdxl=sdxl), _facts(sdxl), request))
    assert template.shape == (128, 64, 3) and np.abs(template.astype(int) - expected.astype(int)).max() <= 1
    width, height = orchestrator.templates.sizes[1], orchestrator.templates.sizes[1]  # type: ignore[union-attr]
    default = orchestrator.paint_template(TemplateOptions("a garden", steps=1), 1)
    assert default.shape == (height, width, 3) == (128, 128, 3)  # the tiny model's usual size


def test_a_template_from_text_without_a_face_streams_its_steps_then_says_so(
    sdxl_server: tuple[generator_pb2_grpc.GeneratorStub, EngineHolder],
) -> None:
    stub, _ = sdxl_server
    progress = []
    with pytest.raises(grpc.RpcError) as info:
        for event in stub.GenerateStream(_from_text(), timeout=120):
            progress.append(event.progress)
    assert [(p.stage, p.step) for p in progress] == [("template_from_text", s) for s in (1, 2, 3)]
    details = error_details(info.value)  # random SDXL weights paint no face
    assert (details["code"], details["reason"]) == ("FAILED_PRECONDITION", "NO_FACE")
    assert "template_from_text" in details["fields"]


class _PhotoPainter:
    """Stands in for the SDXL model (whose random weights paint no face): paints the astronaut."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    def paint(self, options, seed, on_step=None, raise_if_stopped=lambda: None):  # type: ignore[no-untyped-def]
        self.asked.append((options.prompt, seed))
        return sample_photo("astronaut")


def test_each_image_gets_its_own_template_which_goes_through_the_face_loop(
    sdxl_server: tuple[generator_pb2_grpc.GeneratorStub, EngineHolder],
) -> None:
    stub, holder = sdxl_server
    orchestrator = holder.get()
    real, painter = orchestrator.templates, _PhotoPainter()
    orchestrator.templates = painter  # type: ignore[assignment]
    try:
        response = stub.Generate(_from_text(user_ids=["alice"], images_per_template=2), timeout=120)
    finally:
        orchestrator.templates = real
    assert painter.asked == [("a photo of a woman in a garden", 11), ("a photo of a woman in a garden", 12)]
    for image in response.images:
        assert image.faces[0].user_id == "alice" and image.faces[0].HasField("identity_score")
        assert np.array_equal(decode_image(image.template_png), sample_photo("astronaut"))
        assert image.png != image.template_png  # the face was painted into it


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda r: r.templates.append(b"x"), "template_from_text"),
        (lambda r: setattr(r.template_from_text, "width", 72), "template_from_text.width"),
        (lambda r: setattr(r.template_from_text, "height", 4096), "template_from_text.height"),
        (lambda r: setattr(r.template_from_text, "prompt", " "), "template_from_text.prompt"),
        (lambda r: setattr(r.template_from_text, "steps", 0), "template_from_text.steps"),
        (lambda r: setattr(r.template_from_text, "scheduler", "plms"), "template_from_text.scheduler"),
    ],
)
def test_bad_template_from_text_options_are_invalid_arguments_naming_the_field(
    sdxl_server: tuple[generator_pb2_grpc.GeneratorStub, EngineHolder],
    change,
    field: str,  # type: ignore[no-untyped-def]
) -> None:
    request = _from_text()
    change(request)
    with pytest.raises(grpc.RpcError) as info:
        sdxl_server[0].Generate(request, timeout=60)
    details = error_details(info.value)
    assert details["code"] == "INVALID_ARGUMENT" and field in details["fields"]


def test_without_an_sdxl_model_a_template_from_text_is_a_failed_precondition(generator_address: str) -> None:
    with grpc.insecure_channel(generator_address) as channel, pytest.raises(grpc.RpcError) as info:
        generator_pb2_grpc.GeneratorStub(channel).Generate(_from_text(), timeout=60)
    details = error_details(info.value)
    assert (details["code"], details["reason"]) == ("FAILED_PRECONDITION", "MODEL_MISSING")
    assert "template_from_text" in details["fields"] and "--sdxl" in details["message"]


def test_an_sdxl_path_that_is_not_there_fails_loading_naming_the_option(
    alice_data: Path, tmp_path: Path
) -> None:
    holder = EngineHolder(ServerConfig(data=alice_data, sdxl=str(tmp_path / "nowhere")))
    with pytest.raises(ModelMissing, match=r"--sdxl: .*nowhere is not a folder"):
        holder.load()


def test_the_sdxl_roles_export_and_paint_the_same_template_through_a_real_tritonserver(
    install: TritonInstall, tiny: ModelFamily, sdxl: SdxlFamily, tmp_path: Path
) -> None:
    catalogue = role_catalogue(tiny, fused=False, sdxl=sdxl)
    catalogue = catalogue.only(catalogue.templates)
    results = export_all(catalogue, tmp_path / "export", tiny, sdxl=SdxlFacts.of(sdxl), fp16_graphs=False)
    assert sorted((r.role, r.ok) for r in results) == [(name, True) for name in sorted(catalogue.templates)]
    manifest = EngineManifest.read(tmp_path / "export")
    assert manifest.sdxl is not None and manifest.sdxl.tokenizer_2.pad_token == sdxl.tokenizer_2.pad_token
    assert set(manifest.catalogue.templates) == {TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER}
    write_repository(tmp_path / "export", catalogue.roles, tmp_path / "repository")
    server = start_server(tmp_path / "repository", install, free_ports())
    options = TemplateOptions(
        "a portrait in a garden", "blurry", width=64, height=128, steps=4, scheduler="ddim"
    )
    try:
        server.wait_ready()
        triton = TritonBackend(server.grpc_url, manifest.catalogue.templates)
        try:
            theirs = TemplatePainter(triton, manifest.sdxl).paint(options, 5)
        finally:
            triton.close()
    finally:
        server.stop()
    ours = TemplatePainter(TorchBackend(None, "cpu", sdxl=sdxl), SdxlFacts.of(sdxl)).paint(options, 5)
    assert theirs.shape == ours.shape == (128, 64, 3)
    assert np.abs(theirs.astype(int) - ours.astype(int)).max() <= 2  # uint8 levels


def test_an_sdxl_checkpoint_in_the_original_layout_loads_offline_to_the_same_weights(
    sdxl: SdxlFamily, tmp_path: Path, cache_dir: Path
) -> None:
    path = tmp_path / "tiny-sdxl.safetensors"
    save_sdxl_single_file(sdxl, path)
    loaded = load_sdxl_single_file(path, config_dir=Path(sdxl.source))  # the tiny family's shapes
    for name, module in sdxl.modules().items():
        theirs = loaded.modules()[name].state_dict()
        ours = module.state_dict()
        assert set(theirs) == set(ours), name
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
    assert loaded.tokenizer_2.pad_token == "!" and loaded.source == str(path) and not loaded.is_random
    # Without a config folder, a checkpoint is read with SDXL base's shipped configs and tokenizers.
    folder = single_file_config_dir(cache_dir)
    assert json.loads((folder / "unet" / "config.json").read_text())["cross_attention_dim"] == 2048
    assert CLIPTokenizer.from_pretrained(folder / "tokenizer_2").pad_token == "!"
    with pytest.raises(SdxlLoadError, match="cannot load SDXL checkpoint"):  # tiny weights, full shapes
        resolve_sdxl_family(str(path))
