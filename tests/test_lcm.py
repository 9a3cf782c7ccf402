"""The LCM fast path: an LCM-LoRA fused into a copy of the UNet, served as roles of its own
(``lcm_unet``, ``lcm_stage_*``), users' LoRAs on top of it per row, its passes batched apart
from the base's, and the request option that selects the reference's LCM settings."""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from recording_engines import RecordingEngines, random_user_lora, run_together

from easyphoto.diffusion.catalogue import role_catalogue
from easyphoto.diffusion.inpaint import InpaintPass, run_inpaint
from easyphoto.diffusion.passes import LCM_PASSES, REFERENCE_PASSES, reference_stages
from easyphoto.diffusion.steps import StepEngine
from easyphoto.engines.adapters import SampleAdapter
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.backends.triton_backend import TritonBackend
from easyphoto.engines.faces.detect import FaceAnalyzer
from easyphoto.engines.faces.models import default_face_models
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.engines.lora import LoraLayer, LoraWeights, fuse_lora, fused_copy, save_lora
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.loading import tiny_family
from easyphoto.engines.models.variants import LCM, LCM_LORA_WEIGHT, add_lcm_lora
from easyphoto.engines.roles.diffusion import describe_stage, stage_role_name, variant_role
from easyphoto.engines.roles.lora_inputs import describe_with_lora
from easyphoto.engines.roles.manifest import EngineManifest
from easyphoto.export.onnx_export import export_all
from easyphoto.export.triton_repository import write_repository
from easyphoto.export.triton_server import TritonInstall, free_ports, start_server
from easyphoto.fixtures.lcm import random_lcm_lora, write_lcm_lora
from easyphoto.fixtures.photos import sample_photo
from easyphoto.rpc.errors import ModelMissing
from easyphoto.server.options import resolve_options
from easyphoto.server.pipeline import Orchestrator, planned_steps
from easyphoto.users.store import UserStore
from easyphoto.v1 import generator_pb2


@pytest.fixture(scope="module")
def lcm_file(tiny: ModelFamily, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lcm_lora(tiny, tmp_path_factory.mktemp("lcm") / "lcm.safetensors", kohya=True)


@pytest.fixture(scope="module")
def lcm_family(cache_dir: Path, lcm_file: Path) -> ModelFamily:
    """The tiny family, loaded afresh (the session's stays without a variant), with the LCM-LoRA."""
    family = tiny_family(cache_dir)
    add_lcm_lora(family, lcm_file)
    return family


@pytest.fixture(scope="module")
def lcm_engines(lcm_family: ModelFamily) -> Engines:
    backend = TorchBackend(lcm_family, "cpu")
    return Engines(backend, lcm_family.tokenizer, float(lcm_family.vae.config.scaling_factor))


def _user(engines: Engines, seed: int = 3) -> tuple[SampleAdapter, LoraWeights]:
    """A user's LoRA on every layer a trained one targets, as an adapter at weight 0.9."""
    lora = random_user_lora(engines.backend.lora_targets(), f"user{seed}@v1", seed)
    return SampleAdapter(engines.backend.adapter(lora.name, lambda: lora), 0.9), lora


def _unet_inputs(engines: Engines, seed: int = 0) -> dict[str, torch.Tensor]:
    return engines.roles["unet"].sample_inputs("min", seed=seed)


def test_the_lcm_unet_is_the_base_with_the_lcm_lora_fused_and_the_base_is_untouched(
    tiny: ModelFamily, lcm_family: ModelFamily, lcm_engines: Engines
) -> None:
    roles = lcm_engines.roles
    assert roles["lcm_unet"].inputs == roles["unet"].inputs and roles["lcm_unet"].variant == LCM
    assert lcm_engines.unet_variants == {LCM}
    inputs = _unet_inputs(lcm_engines)
    base = TorchBackend(tiny, "cpu").infer("unet", inputs)["noise_pred"]
    assert torch.equal(lcm_engines.backend.infer("unet", inputs)["noise_pred"], base)
    lcm = lcm_engines.backend.infer("lcm_unet", inputs)["noise_pred"]
    assert (lcm - base).abs().mean() > 0.01 * base.abs().mean()


def test_a_users_lora_applies_per_row_on_top_of_the_lcm_unet(
    lcm_family: ModelFamily, lcm_engines: Engines
) -> None:
    user, lora = _user(lcm_engines)
    inputs = {name: torch.cat([t, t]) for name, t in _unet_inputs(lcm_engines).items()}
    out = lcm_engines.backend.infer("lcm_unet", inputs, [user, None])["noise_pred"]
    plain = lcm_engines.backend.infer("lcm_unet", inputs)["noise_pred"]
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=0)  # the row without an adapter
    # The user's LoRA merged by hand into a copy of the LCM UNet computes the adapted row.
    merged = fused_copy(lcm_family.unet_variants[LCM], lora, "unet", user.weight)
    args = [inputs[spec.name][:1] for spec in lcm_engines.roles["unet"].inputs]
    with torch.no_grad():
        expected = merged(args[0], args[1], args[2], down_block_additional_residuals=list(args[3:-1]),
                          mid_block_additional_residual=args[-1]).sample  # fmt: skip
    torch.testing.assert_close(out[:1], expected, rtol=1e-3, atol=1e-4)
    assert (out[0] - plain[0]).abs().max() > 1e-3


def test_peft_and_kohya_files_fuse_the_same_weights(tiny: ModelFamily, tmp_path: Path) -> None:
    fused = {}
    for kohya in (False, True):
        family = replace(tiny, unet_variants={})
        add_lcm_lora(family, write_lcm_lora(tiny, tmp_path / f"lcm-{kohya}.safetensors", kohya=kohya))
        fused[kohya] = family.unet_variants[LCM].state_dict()
    assert fused[False].keys() == fused[True].keys()
    assert all(torch.equal(fused[False][key], fused[True][key]) for key in fused[False])
    assert not torch.equal(fused[True]["conv_in.weight"], tiny.unet.state_dict()["conv_in.weight"])


def test_a_missing_or_wrong_lcm_lora_is_a_failed_precondition_naming_the_option_and_file(
    tiny: ModelFamily, tmp_path: Path
) -> None:
    family = replace(tiny, unet_variants={})
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(ModelMissing, match=r"--lcm-lora: .*absent\.safetensors does not exist") as error:
        add_lcm_lora(family, missing)
    assert error.value.code == "FAILED_PRECONDITION" and error.value.field == "lcm-lora"
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelMissing, match=r"garbage\.safetensors is not an LCM-LoRA"):
        add_lcm_lora(family, garbage)
    text = tmp_path / "text.safetensors"
    shape = tiny.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj").weight.shape
    layer = LoraLayer("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj",
                      torch.zeros(2, shape[1]), torch.zeros(shape[0], 2), 2.0)  # fmt: skip
    save_lora(LoraWeights("te", [*random_lcm_lora(tiny).layers, layer]), text)
    with pytest.raises(ModelMissing, match=r"adapts \['text_encoder'\]; an LCM-LoRA adapts only the UNet"):
        add_lcm_lora(family, text)
    wrong = tmp_path / "wrong.safetensors"
    bad = LoraLayer("unet", "conv_in", torch.zeros(2, 5, 3, 3), torch.zeros(7, 2, 1, 1), 2.0)
    save_lora(LoraWeights("bad", [bad]), wrong)
    with pytest.raises(ModelMissing, match=r"conv_in is .* the model's weight is"):
        add_lcm_lora(family, wrong)
    assert family.unet_variants == {}  # nothing was added by any of them


def test_lcm_stages_are_catalogued_and_their_lora_graph_adapts_the_lcm_unet(
    lcm_family: ModelFamily, lcm_engines: Engines
) -> None:
    catalogue = role_catalogue(lcm_family, fused=True)
    for kinds in reference_stages():
        stage = catalogue.stages[variant_role(stage_role_name(kinds), LCM)]
        assert stage.variant == LCM and stage.lora_target == "unet"
    assert catalogue.family["lcm_unet"].manifest()["variant"] == LCM
    # The graph with LoRA inputs of lcm_unet: a row at scale 0 is the LCM UNet itself, a row with
    # the user's factors is the LCM UNet with the user's adapter, as the torch backend computes.
    with_lora = describe_with_lora(catalogue.family["lcm_unet"], lcm_family)
    module = with_lora.build_module()
    user, _ = _user(lcm_engines)
    inputs = {name: torch.cat([t, t]) for name, t in _unet_inputs(lcm_engines, seed=1).items()}
    layers = sorted(lcm_engines.backend.lora_targets()["unet"])
    factors = []
    for layer in layers:
        pair = user.adapter.layers[("unet", layer)]
        factors += [pair.down[None], pair.up[None]]
    args = [inputs[spec.name] for spec in catalogue.family["lcm_unet"].inputs]
    with torch.no_grad():
        (out,) = module(*args, torch.tensor([0, 0]), torch.tensor([user.weight, 0.0]), *factors)
    expected = lcm_engines.backend.infer("lcm_unet", inputs, [user, None])["noise_pred"]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def _pass(engines: Engines, seed: int, variant: str) -> InpaintPass:
    generator = torch.Generator().manual_seed(seed)
    size = 64
    mask = torch.zeros(1, 1, size, size)
    mask[..., 16:48, 16:48] = 1
    embeds = engines.encode_prompts(["easyphoto_face", ""])
    settings = LCM_PASSES["first_pass"]  # for both UNets: only the variant tells them apart
    return InpaintPass(
        image=torch.rand(1, 3, size, size, generator=generator) * 2 - 1, mask=mask,
        prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:],
        controls=[ControlInput("canny", torch.rand(1, 3, size, size, generator=generator), 0.5)],
        steps=settings.steps, strength=settings.strength, guidance_scale=settings.guidance_scale,
        scheduler=settings.scheduler, generator=torch.Generator().manual_seed(seed), unet_variant=variant,
    )  # fmt: skip


def test_lcm_passes_batch_with_each_other_apart_from_the_base_and_end_as_alone(
    lcm_family: ModelFamily, lcm_engines: Engines
) -> None:
    variants = ["lcm", "lcm", "", ""]
    calls: list[tuple[str, int, int]] = []
    engine = StepEngine(lcm_engines, lcm_family.scheduler_config, on_call=lambda *call: calls.append(call))
    try:
        makers = [partial(_pass, lcm_engines, index, variant) for index, variant in enumerate(variants)]
        results = run_together(engine, makers)
    finally:
        engine.close()
    for index, variant in enumerate(variants):
        alone = run_inpaint(lcm_engines, _pass(lcm_engines, index, variant), lcm_family.scheduler_config)
        got = results[index]
        assert isinstance(got, torch.Tensor), got
        # Batched rows round differently in fp32 (test_steps measures 53 dB and up): no drift.
        mse = float(((got - alone) / 2).pow(2).mean())
        assert mse == 0 or -10 * torch.log10(torch.tensor(mse)) > 45, (index, mse)
    steps = [call for call in calls if call[0] == "denoise"]
    # Four passes of the same shapes and steps: two per call at most (never an LCM pass with a
    # base one), and some call had two.
    assert max(jobs for _, jobs, _ in steps) == 2
    assert sum(jobs for _, jobs, _ in steps) == 4 * LCM_PASSES["first_pass"].denoising_steps == 24


def test_lcm_accelerate_takes_the_reference_lcm_settings_under_what_the_request_sets() -> None:
    plain = resolve_options(generator_pb2.GenerateRequest())
    assert not plain.lcm_accelerate and plain.unet_variant == ""
    request = generator_pb2.GenerateRequest(lcm_accelerate=True)
    request.second_pass.steps = 10
    options = resolve_options(request)
    assert options.lcm_accelerate and options.unet_variant == LCM
    first, second, seam = options.first_pass, options.second_pass, options.seam_pass
    assert (first.steps, first.strength, first.guidance_scale, first.scheduler) == (12, 0.5, 2.0, "lcm")
    assert (second.steps, second.strength, second.guidance_scale) == (10, 0.35, 2.0)  # steps as asked
    assert (seam.steps, seam.strength, seam.scheduler) == (8, 0.30, "lcm")
    assert first.control_weights() == REFERENCE_PASSES["first_pass"].control_weights()
    # 6 + 3 steps for one face, against 22 + 7 by default.
    assert planned_steps(options, 1) == 9 and planned_steps(plain, 1) == 29


def _orchestrator(engines: Engines, family: ModelFamily, faces: FaceAnalyzer, data: Path) -> Orchestrator:
    return Orchestrator(engines, family.scheduler_config, default_face_models(), faces, UserStore(data))


def test_a_generate_with_lcm_accelerate_paints_every_step_with_the_lcm_unet(
    lcm_family: ModelFamily, faces: FaceAnalyzer, alice_data: Path
) -> None:
    engines = RecordingEngines(
        TorchBackend(lcm_family, "cpu"), lcm_family.tokenizer, float(lcm_family.vae.config.scaling_factor)
    )
    orchestrator = _orchestrator(engines, lcm_family, faces, alice_data)
    try:
        options = replace(
            resolve_options(generator_pb2.GenerateRequest(lcm_accelerate=True)), crop_short_side=256
        )
        steps: list[tuple[str, int, int]] = []
        result = orchestrator.generate(
            sample_photo("astronaut"), ["alice"], options, seed=2,
            on_progress=lambda p: steps.append((p.stage, p.step, p.total_steps)),
        )  # fmt: skip
        assert result.faces[0].user_id == "alice"
        assert engines.variants == [LCM] * planned_steps(options, 1)
        assert [s for s in steps if s[1] == s[2]] == [("first_diffusion", 6, 6), ("second_diffusion", 2, 2)]
        engines.variants.clear()
        # The same pass settings without the option: the base UNet paints them.
        orchestrator.generate(
            sample_photo("astronaut"), ["alice"], replace(options, lcm_accelerate=False), seed=2
        )
        assert engines.variants == [""] * planned_steps(options, 1)
    finally:
        orchestrator.close()


def test_lcm_accelerate_without_an_lcm_lora_is_refused_before_any_model_runs(
    tiny: ModelFamily, faces: FaceAnalyzer, alice_data: Path
) -> None:
    engines = RecordingEngines(
        TorchBackend(tiny, "cpu"), tiny.tokenizer, float(tiny.vae.config.scaling_factor)
    )
    orchestrator = _orchestrator(engines, tiny, faces, alice_data)
    try:
        options = resolve_options(generator_pb2.GenerateRequest(lcm_accelerate=True))
        with pytest.raises(ModelMissing, match="lcm_accelerate needs an LCM-LoRA") as refused:
            orchestrator.generate(sample_photo("astronaut"), ["alice"], options, seed=1)
        assert refused.value.code == "FAILED_PRECONDITION" and refused.value.field == "lcm_accelerate"
        assert engines.calls == []
    finally:
        orchestrator.close()


def test_the_lcm_unets_weights_are_the_bases_plus_its_updates_at_the_lcm_weight(
    tiny: ModelFamily, lcm_family: ModelFamily
) -> None:
    copy = fused_copy(tiny.unet, LoraWeights("none", []), "unet", 1.0)
    fuse_lora(copy, random_lcm_lora(tiny), "unet", LCM_LORA_WEIGHT)
    served = lcm_family.unet_variants[LCM].state_dict()
    for key, value in copy.state_dict().items():
        torch.testing.assert_close(served[key], value, rtol=0, atol=1e-6)


def test_serve_fuses_its_lcm_lora_at_load_and_a_missing_one_fails_loading(
    lcm_file: Path, alice_data: Path, tmp_path: Path
) -> None:
    from easyphoto.server.app import EngineHolder, ServerConfig

    holder = EngineHolder(ServerConfig(data=alice_data, lcm_lora=lcm_file, lcm_lora_weight=0.5))
    orchestrator = holder.load()
    try:
        assert orchestrator.engines.unet_variants == {LCM}
        family = orchestrator.engines.backend.family  # type: ignore[attr-defined]
        conv_in = next(layer for layer in random_lcm_lora(family).layers if layer.module == "conv_in")
        expected = family.unet.conv_in.weight + 0.5 * conv_in.delta()  # at the weight it was given
        torch.testing.assert_close(family.unet_variants[LCM].conv_in.weight, expected, rtol=0, atol=1e-6)
    finally:
        holder.close()
    absent = EngineHolder(ServerConfig(data=alice_data, lcm_lora=tmp_path / "none.safetensors"))
    with pytest.raises(ModelMissing, match=r"--lcm-lora: .*none\.safetensors does not exist"):
        absent.load()


def test_an_lcm_step_is_one_call_of_its_fused_lcm_stage_and_equals_its_nets_and_lcm_unet(
    lcm_family: ModelFamily, lcm_engines: Engines
) -> None:
    kinds = reference_stages()[1]  # canny + tile, the second pass
    fused_backend = TorchBackend(lcm_family, "cpu")
    fused_backend.add_role(describe_stage(lcm_family, kinds, LCM))
    fused_backend.add_role(describe_stage(lcm_family, kinds))
    called: list[str] = []
    infer = fused_backend.infer
    fused_backend.infer = lambda role, inputs, *rest: called.append(role) or infer(role, inputs, *rest)  # type: ignore[method-assign]
    fused = Engines(fused_backend, lcm_family.tokenizer, 1.0)
    user, _ = _user(lcm_engines)
    fused_user = SampleAdapter(fused_backend.adapter(user.adapter.name, lambda: _user(lcm_engines)[1]), 0.9)
    one = _unet_inputs(lcm_engines, seed=2)
    height, width = (8 * side for side in one["sample"].shape[2:])
    generator = torch.Generator().manual_seed(4)
    controls = [
        ControlInput(kind, torch.rand(2, 3, height, width, generator=generator), 0.7) for kind in kinds
    ]
    sample, timestep, text = (
        torch.cat([one[name]] * 2) for name in ("sample", "timestep", "encoder_hidden_states")
    )
    for variant in (LCM, ""):
        called.clear()
        got = fused.predict_noise(sample, timestep, text, controls, [fused_user, None], variant)
        assert called == [variant_role(stage_role_name(kinds), variant)]  # one call per step
        separate = lcm_engines.predict_noise(sample, timestep, text, controls, [user, None], variant)
        torch.testing.assert_close(got, separate, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(
        fused.predict_noise(sample, timestep, text, controls, None, LCM),
        fused.predict_noise(sample, timestep, text, controls, None, ""),
        atol=1e-3,
    )


def test_the_lcm_unet_exports_and_paints_users_through_a_real_tritonserver(
    install: TritonInstall, lcm_family: ModelFamily, lcm_engines: Engines, lcm_file: Path, tmp_path: Path
) -> None:
    """The LCM UNet and its graph with LoRA inputs exported, served by the CPU tritonserver, rows of a
    user and of no user in one call equal to the torch backend; serve --backend triton refuses its
    own --lcm-lora (the export fused it)."""
    catalogue = role_catalogue(lcm_family, fused=False).only(["lcm_unet"])
    results = export_all(catalogue, tmp_path / "export", lcm_family, fp16_graphs=False)
    assert [(r.role, r.ok) for r in results] == [("lcm_unet", True), ("lcm_unet_lora", True)]
    manifest = EngineManifest.read(tmp_path / "export")
    assert manifest.catalogue.family["lcm_unet"].variant == LCM
    assert manifest.files["lcm_unet"]["onnx_lora"] == "lcm_unet_lora/model.onnx"
    adapters = tmp_path / "adapters"
    write_repository(tmp_path / "export", catalogue.roles, tmp_path / "repository", adapter_dir=adapters)
    server = start_server(tmp_path / "repository", install, free_ports())
    try:
        server.wait_ready()
        triton = TritonBackend(
            server.grpc_url,
            manifest.catalogue.roles,
            lora_targets=manifest.lora_targets,
            adapter_dir=adapters,
        )
        try:
            user, lora = _user(lcm_engines, seed=5)
            remote_user = SampleAdapter(triton.adapter(lora.name, lambda: lora), user.weight)
            inputs = {name: torch.cat([t, t]) for name, t in _unet_inputs(lcm_engines, seed=3).items()}
            theirs = triton.infer("lcm_unet", inputs, [remote_user, None])["noise_pred"]
            ours = lcm_engines.backend.infer("lcm_unet", inputs, [user, None])["noise_pred"]
            assert float((theirs - ours).abs().max()) <= 1e-4 * float(ours.abs().max())
        finally:
            triton.close()
    finally:
        server.stop()
    from easyphoto.server.app import EngineHolder, ServerConfig

    holder = EngineHolder(
        ServerConfig(backend="triton", export_dir=tmp_path / "export", lcm_lora=lcm_file, data=tmp_path)
    )
    with pytest.raises(ModelMissing, match=r"fused at export .* has one: serve without --lcm-lora"):
        holder.load()


def test_the_bench_section_puts_both_paths_side_by_side_with_their_ratio() -> None:
    from easyphoto.server.lcm_bench import _section

    rows = [("default", 1, 29, 0.1, [10.0]), ("lcm", 1, 8, 0.3, [3.0]), ("default", 4, 29, 0.2, [20.0])]
    rows.append(("lcm", 4, 8, 0.5, [7.0, 8.0]))
    section = _section("tiny", 4, rows).splitlines()
    assert section[0] == "<!-- bench:lcm:tiny:begin -->" and section[-1] == "<!-- bench:lcm:tiny:end -->"
    assert "| lcm | 8 | 4 | 0.500 | 7.50 |" in section and "| default | 29 | 1 | 0.100 | 10.00 |" in section
    assert "**3.00x at concurrency 1, 2.50x at concurrency 4**" in section[-2]
