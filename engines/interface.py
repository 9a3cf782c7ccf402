"""The engine interface the orchestrator and the trainer call, whatever the backend.

A backend runs a role on named tensors (:class:`Backend`). :class:`Engines` is the typed facade
on top: prompt encoding with a per-prompt cache, VAE encode/decode with diffusers' sampling and
scaling, ControlNet residuals summed across nets as diffusers' ``MultiControlNetModel`` does, and
the UNet step. It is the same code over the torch and the triton backend.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from transformers import CLIPTokenizer

from easyphoto.rpc.errors import ModelMissing, RoleNotServed

from .adapters import Adapter, AdapterRows, SampleAdapter, active_rows
from .lora import LoraTargets, LoraWeights
from .roles.description import RoleDescription
from .roles.diffusion import (
    CONTROLNET_PREFIX,
    STEP_INPUTS,
    controlnet_role,
    pixels_per_latent,
    residual_inputs,
    stage_control_inputs,
    stage_role_name,
    sum_residuals,
    variant_role,
)

Tensors = dict[str, torch.Tensor]


class Backend(Protocol):
    name: str

    @property
    def roles(self) -> dict[str, RoleDescription]: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def infer(self, role: str, inputs: Tensors, adapters: AdapterRows | None = None) -> Tensors:
        """One call; ``adapters`` gives each row of the batch its user's LoRA (or None), for the
        roles that take one (``RoleDescription.lora_target``)."""
        ...

    def infer_many(self, calls: list[tuple[str, Tensors]]) -> list[Tensors]:
        """Several independent calls; a remote backend runs them concurrently."""
        ...

    def ready(self) -> bool: ...

    def lora_targets(self) -> LoraTargets:
        """The layers a LoRA may patch, with their shapes (they resolve kohya keys and check fit)."""
        ...

    def adapter(self, name: str, load: Callable[[], LoraWeights]) -> Adapter:
        """The adapter ``name`` (``user@vN``) ready on this backend: from its hot cache, else made
        from ``load()``'s LoRA (InvalidArgument when it does not fit the model)."""
        ...

    def retire_adapters(self, which: Callable[[str], bool]) -> None:
        """Drops the adapters ``which`` names from the hot cache (a user's older versions, once a
        newer one is published); a batch running with one keeps it until it ends."""
        ...

    def warm_adapter(self, adapter: Adapter) -> None:
        """Readies ``adapter`` wherever the models keep adapters (RefreshUser, for a newly published
        user), so that its first request loads nothing."""
        ...

    def close(self) -> None:
        """Releases connections and shared memory (the server calls it when it stops)."""
        ...


@dataclass(frozen=True)
class ControlInput:
    """One ControlNet of a pass: its kind, its prepared image in [0, 1] (NCHW, a row per sample) and
    its weight: one for every row, or a ``[batch]`` tensor of one per row (a batch of several
    requests' steps)."""

    kind: str
    image: torch.Tensor
    scale: float | torch.Tensor

    def scale_tensor(self, like: torch.Tensor) -> torch.Tensor:
        """The per-sample ``[batch]`` scales the ControlNet and stage roles take, on ``like``'s device
        (``like``: the step's sample, whose first axis is the batch)."""
        if isinstance(self.scale, torch.Tensor):
            return self.scale.to(dtype=like.dtype, device=like.device)
        return torch.full((like.shape[0],), self.scale, dtype=like.dtype, device=like.device)


class Engines:
    def __init__(
        self,
        backend: Backend,
        tokenizer: CLIPTokenizer,
        vae_scaling_factor: float,
        prompt_cache_size: int = 256,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.vae_scaling_factor = vae_scaling_factor
        # Text embeddings by (text-encoder adapter and weight, prompt): a user's LoRA changes them.
        self._prompt_cache: OrderedDict[tuple[tuple[str, float] | None, str], torch.Tensor] = OrderedDict()
        self._prompt_cache_size = prompt_cache_size
        self._prompt_lock = threading.Lock()
        # Who runs the text encoder for prompts not cached: the backend, or a step engine that
        # batches them with other requests' (the orchestrator sets its own).
        self.text_encoder: Callable[[torch.Tensor, AdapterRows | None], torch.Tensor] = self.embed_in_backend

    @property
    def roles(self) -> dict[str, RoleDescription]:
        return self.backend.roles

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel, read off the VAE decoder's description."""
        return pixels_per_latent(self.roles["vae_decoder"])

    @property
    def image_multiple(self) -> int:
        """Image sides must be multiples of this (the UNet's down factor in pixels)."""
        return self.roles["unet"].axes["latent_height"].multiple * self.vae_scale_factor

    @property
    def max_image_side(self) -> int:
        return self.roles["unet"].axes["latent_height"].max * self.vae_scale_factor

    @property
    def unet_variants(self) -> set[str]:
        """The UNet variants this deployment serves beside the base (``lcm``: an LCM-LoRA fused)."""
        return {role.variant for role in self.roles.values() if role.variant}

    @property
    def controlnet_kinds(self) -> list[str]:
        return [
            name.removeprefix(CONTROLNET_PREFIX) for name in self.roles if name.startswith(CONTROLNET_PREFIX)
        ]

    # ---- text ----

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return ids.to(torch.int32)

    def embed_in_backend(self, ids: torch.Tensor, adapters: AdapterRows | None) -> torch.Tensor:
        """The text encoder's last hidden states of ``ids``, one backend call."""
        return self.backend.infer("text_encoder", {"input_ids": ids}, adapters)["last_hidden_state"]

    def encode_prompts(self, prompts: Sequence[str], adapter: SampleAdapter | None = None) -> torch.Tensor:
        """Text embeddings (B, 77, hidden) with ``adapter``'s text-encoder layers, if it has any:
        computed once per (adapter, weight, prompt) and cached."""
        adapter = (active_rows([adapter], "text_encoder") or [None])[0]
        keys = [(adapter.key if adapter else None, p) for p in prompts]
        with self._prompt_lock:  # the hits taken now: other requests may evict them meanwhile
            found = {key: self._prompt_cache[key] for key in dict.fromkeys(keys) if key in self._prompt_cache}
            for key in found:
                self._prompt_cache.move_to_end(key)
        missing = [key for key in dict.fromkeys(keys) if key not in found]
        if missing:
            ids = self.tokenize([p for _, p in missing]).to(self.backend.device)
            rows = [adapter] * len(missing) if adapter else None
            computed = dict(zip(missing, self.text_encoder(ids, rows), strict=True))
            found.update(computed)
            with self._prompt_lock:
                self._prompt_cache.update(computed)
                while len(self._prompt_cache) > self._prompt_cache_size:
                    self._prompt_cache.popitem(last=False)
        return torch.stack([found[key] for key in keys])

    # ---- VAE ----

    def vae_moments(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE encoder's Gaussian moments of images in [-1, 1] (the model call of an encode)."""
        return self.backend.infer("vae_encoder", {"images": images})["latent_moments"]

    def latents_from_moments(self, moments: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """UNet-space latents sampled from the moments with ``generator`` (each request its own)."""
        latents = DiagonalGaussianDistribution(moments).sample(generator=generator)
        return latents * self.vae_scaling_factor

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.backend.infer("vae_decoder", {"latents": latents})["images"]

    # ---- denoising ----

    def controlnets(
        self,
        controls: Sequence[ControlInput],
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
    ) -> list[list[torch.Tensor]]:
        """Every ControlNet's residuals (in declared order), the calls sent together."""
        calls = []
        for control in controls:
            role = controlnet_role(control.kind)
            if role not in self.roles:
                raise ModelMissing(f"no {control.kind} ControlNet is loaded; have {self.controlnet_kinds}")
            inputs = _step_inputs(sample, timestep, encoder_hidden_states)
            inputs.update(controlnet_cond=control.image, conditioning_scale=control.scale_tensor(sample))
            calls.append((role, inputs))
        results = self.backend.infer_many(calls)
        return [
            [out[spec.name] for spec in self.roles[role].outputs]
            for (role, _), out in zip(calls, results, strict=True)
        ]

    def zero_residuals(self, sample: torch.Tensor) -> list[torch.Tensor]:
        _, _, height, width = sample.shape
        values = {"batch": sample.shape[0], "latent_height": height, "latent_width": width}
        return [
            torch.zeros(spec.resolve(values), dtype=sample.dtype, device=sample.device)
            for spec in residual_inputs(self.roles["unet"])
        ]

    def unet(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        residuals: Sequence[torch.Tensor],
        adapters: AdapterRows | None = None,
        variant: str = "",
    ) -> torch.Tensor:
        role = self._role(variant_role("unet", variant))
        inputs = _step_inputs(sample, timestep, encoder_hidden_states)
        names = (spec.name for spec in residual_inputs(self.roles[role]))
        inputs.update(zip(names, residuals, strict=True))
        return self.backend.infer(role, inputs, adapters)["noise_pred"]

    def _role(self, name: str) -> str:
        """``name`` when this deployment serves it, else ModelMissing (a UNet variant it lacks)."""
        if name not in self.roles:
            raise ModelMissing(f"this deployment serves no {name} role; it has {sorted(self.roles)}")
        return name

    def predict_noise(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        controls: Sequence[ControlInput],
        adapters: AdapterRows | None = None,
        variant: str = "",
    ) -> torch.Tensor:
        """One model evaluation: every ControlNet, residuals summed in order, then the UNet of
        ``variant`` (``""``: the base) with each row's adapter (``adapters``, one per row;
        ControlNets carry no LoRA); one call of the fused stage role when the backend serves one
        for exactly these ControlNets and this variant."""
        timesteps = timestep.reshape(-1).expand(sample.shape[0]).to(sample.dtype)
        stage = variant_role(stage_role_name(tuple(c.kind for c in controls)), variant) if controls else ""
        if stage in self.roles:
            inputs = _step_inputs(sample, timesteps, encoder_hidden_states)
            for control in controls:
                image, scale = stage_control_inputs(control.kind)
                inputs.update({image: control.image, scale: control.scale_tensor(sample)})
            with contextlib.suppress(RoleNotServed):  # dropped by the engines since: its nets instead
                return self.backend.infer(stage, inputs, adapters)["noise_pred"]
        residuals = self.residuals(controls, sample, timesteps, encoder_hidden_states)
        return self.unet(sample, timesteps, encoder_hidden_states, residuals, adapters, variant)

    def residuals(
        self,
        controls: Sequence[ControlInput],
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
    ) -> list[torch.Tensor]:
        """The residuals the UNet takes: every ControlNet's summed in order, zeros without any."""
        if not controls:
            return self.zero_residuals(sample)
        return sum_residuals(self.controlnets(controls, sample, timestep, encoder_hidden_states))


def _step_inputs(
    sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> Tensors:
    """The inputs every denoising role (UNet, ControlNet, fused stage) takes first."""
    return dict(zip(STEP_INPUTS, (sample, timestep, encoder_hidden_states), strict=True))
