"""Templates from text: the tiny seeded SDXL family, its roles, and the text-to-image pass, which
equals diffusers' StableDiffusionXLPipeline at the same seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from easyphoto.diffusion.schedulers import make_scheduler
from easyphoto.diffusion.text_to_image import SdxlFacts, TextToImage, run_text_to_image
from easyphoto.engines.backends.torch_backend import TorchBackend
from easyphoto.engines.models.family import ModelFamily
from easyphoto.engines.models.sdxl import SdxlFamily, SdxlLoadError, load_sdxl_family, tiny_sdxl_family
from easyphoto.engines.roles.sdxl import TEXT_ENCODER_2, UNET, VAE_DECODER


@pytest.fixture(scope="module")
def sdxl(cache_dir: Path) -> SdxlFamily:
    return tiny_sdxl_family(cache_dir)


@pytest.fixture(scope="module")
def backend(sdxl: SdxlFamily) -> TorchBackend:
    return TorchBackend(None, "cpu", sdxl=sdxl)


def _facts(sdxl: SdxlFamily) -> SdxlFacts:
    return SdxlFacts(
        sdxl.tokenizer, sdxl.tokenizer_2, sdxl.scheduler_config, float(sdxl.vae.config.scaling_factor)
    )


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
