"""LoRA training with peft on the UNet and the CLIP text encoder (MISSION.md §1.7).

Adapters go on the transformer blocks' attention and feed-forward Linear layers and their 1×1
``proj_in``/``proj_out`` convolutions, and on the text encoder's attention and MLP; rank 128,
alpha 64 by default. ε- (or v-) prediction MSE at uniform timesteps, AdamW with per-model learning
rates, gradient accumulation and clipping, fp16 autocast on CUDA.

Every random choice of step ``n`` (photos, crops, flips, noise, timesteps) comes from generators
seeded by ``(seed, n)``, so a job resumed from a checkpoint continues exactly as it would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from torch import nn

from easyphoto.engines.lora import (
    TARGET_MODULES,
    LoraLayer,
    LoraWeights,
    file_name,
    load_lora,
    module_name,
    save_lora,
)
from easyphoto.engines.models.family import ModelFamily
from easyphoto.imaging.codec import to_model
from easyphoto.imaging.geometry import resize
from easyphoto.users.durable import replace_durably

from .options import TrainingOptions

ADAPTER = "easyphoto"


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % 2**63)


@dataclass
class TrainingImages:
    """The matted crops, served as deterministic random batches: short side resized to the
    resolution, a random square crop, a random horizontal flip."""

    crops: list[np.ndarray]
    resolution: int
    random_flip: bool

    def __post_init__(self) -> None:
        self._resized = [self._short_side(crop) for crop in self.crops]

    def _short_side(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        scale = self.resolution / min(height, width)
        return resize(
            image, max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale))
        )

    def batch(self, generator: torch.Generator, size: int) -> torch.Tensor:
        images = []
        for _ in range(size):
            image = self._resized[int(torch.randint(len(self._resized), (1,), generator=generator))]
            height, width = image.shape[:2]
            top = int(torch.randint(height - self.resolution + 1, (1,), generator=generator))
            left = int(torch.randint(width - self.resolution + 1, (1,), generator=generator))
            crop = image[top : top + self.resolution, left : left + self.resolution]
            if self.random_flip and bool(torch.rand(1, generator=generator) < 0.5):
                crop = crop[:, ::-1]
            images.append(to_model(np.ascontiguousarray(crop)))
        return torch.cat(images)


class LoraTrainer:
    """Owns the job's copy of the UNet and text encoder with peft adapters injected."""

    def __init__(
        self, family: ModelFamily, images: TrainingImages, options: TrainingOptions, seed: int, device: str
    ) -> None:
        self.family = family
        self.images = images
        self.options = options
        self.seed = seed
        self.device = torch.device(device)
        self.targets: dict[str, nn.Module] = {"unet": family.unet}
        if options.train_text_encoder:
            self.targets["text_encoder"] = family.text_encoder
        for module in (family.unet, family.text_encoder, family.vae):
            module.requires_grad_(False)
            module.to(self.device)
        for salt, (target, module) in enumerate(self.targets.items()):
            config = LoraConfig(
                r=options.rank,
                lora_alpha=options.alpha,  # type: ignore[arg-type]  # peft scales by alpha / r; floats work
                init_lora_weights="gaussian",
                target_modules=TARGET_MODULES[target],
            )
            # peft draws the initial weights from torch's global generator (on the CPU, before
            # moving them): seeded from the job's seed, and the process's generator left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.random.default_generator.manual_seed(step_generator(seed, 0, salt).initial_seed())
                inject_adapter_in_model(config, module, ADAPTER)
        learning_rates = {
            "unet": options.unet_learning_rate,
            "text_encoder": options.text_encoder_learning_rate,
        }
        self.parameters = {
            t: [p for name, p in m.named_parameters() if "lora_" in name] for t, m in self.targets.items()
        }
        self.optimizer = torch.optim.AdamW(
            [{"params": self.parameters[t], "lr": learning_rates[t]} for t in self.targets],
            weight_decay=options.weight_decay,
        )
        self.fp16 = options.mixed_precision and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.fp16)
        self.noise_scheduler = DDPMScheduler.from_config(family.scheduler_config)
        ids = family.tokenizer(
            [options.caption], padding="max_length", max_length=family.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids  # fmt: skip
        self.input_ids = ids.to(self.device)

    # ---- training ----

    def train(self) -> None:
        """Training mode; only the adapters learn (whoever froze the model meanwhile)."""
        for target, module in self.targets.items():
            module.train()
            for param in self.parameters[target]:
                param.requires_grad_(True)

    def eval(self) -> None:
        for module in self.targets.values():
            module.eval()

    def train_step(self, step: int) -> float:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; the mean loss."""
        self.train()
        accumulation = self.options.gradient_accumulation_steps
        losses = []
        for micro in range(accumulation):
            generator = step_generator(self.seed, step, micro)
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.fp16):
                loss = self._loss(generator)
            self.scaler.scale(loss / accumulation).backward()
            losses.append(float(loss.detach()))
        self.scaler.unscale_(self.optimizer)
        every = [p for params in self.parameters.values() for p in params]
        torch.nn.utils.clip_grad_norm_(every, self.options.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(np.mean(losses))

    def _loss(self, generator: torch.Generator) -> torch.Tensor:
        pixels = self.images.batch(generator, self.options.batch_size).to(self.device)
        with torch.no_grad():
            latents = self.family.vae.encode(pixels).latent_dist.sample(generator=generator)
            latents = latents * float(self.family.vae.config.scaling_factor)
        noise = torch.randn(latents.shape, generator=generator).to(self.device)
        count = int(self.noise_scheduler.config.num_train_timesteps)
        timesteps = torch.randint(0, count, (latents.shape[0],), generator=generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        ids = self.input_ids.expand(latents.shape[0], -1)
        hidden = self.family.text_encoder(ids)[0]
        prediction = self.family.unet(noisy, timesteps, hidden).sample
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float())

    # ---- weights ----

    def lora(self, name: str) -> LoraWeights:
        """The current adapters as a LoRA file's layers (copies, on the CPU)."""
        layers = []
        for target, module in self.targets.items():
            state = get_peft_model_state_dict(module, adapter_name=ADAPTER)
            for key, down in state.items():
                if not key.endswith(".lora_A.weight"):
                    continue
                stem = key.removesuffix(".lora_A.weight")
                up = state[f"{stem}.lora_B.weight"]
                layers.append(
                    LoraLayer(
                        target,
                        file_name(target, module, stem),
                        down.detach().cpu().clone(),
                        up.detach().cpu().clone(),
                        self.options.alpha,
                    )
                )
        return LoraWeights(name, layers)

    def load_lora(self, lora: LoraWeights) -> None:
        for target, module in self.targets.items():
            state = {}
            for layer in (x for x in lora.layers if x.target == target):
                stem = module_name(module, layer.module)
                state[f"{stem}.lora_A.weight"] = layer.down
                state[f"{stem}.lora_B.weight"] = layer.up
            result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"checkpoint layers not in the model: {unexpected[:3]}")

    def save_checkpoint(
        self, folder: Path, step: int, optimizer: torch.optim.Optimizer | None = None
    ) -> Path:
        """``step-N.safetensors`` (the LoRA) and ``step-N.pt`` (``optimizer``'s state, the training
        one by default, and the scaler's), each written under a temporary name and renamed, the
        LoRA last: a LoRA file means a whole checkpoint."""
        folder.mkdir(parents=True, exist_ok=True)
        lora_path = checkpoint_path(folder, step)
        state_path = lora_path.with_suffix(".pt")
        temporary = folder / f".step-{step:06d}.pt.tmp"
        state = {"optimizer": (optimizer or self.optimizer).state_dict(), "scaler": self.scaler.state_dict()}
        torch.save(state, temporary)
        replace_durably(temporary, state_path)
        temporary = folder / f".step-{step:06d}.safetensors.tmp"
        save_lora(self.lora(f"step-{step}"), temporary)
        replace_durably(temporary, lora_path)
        return lora_path

    def load_checkpoint(self, lora_path: Path, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Both files are read before anything is applied: an unreadable checkpoint raises and
        leaves the trainer as it was (``optimizer``: the one it was saved with)."""
        lora = load_lora(lora_path)
        state = torch.load(lora_path.with_suffix(".pt"), map_location=self.device, weights_only=True)
        self.load_lora(lora)
        (optimizer or self.optimizer).load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])


def checkpoint_path(folder: Path, step: int) -> Path:
    """Step ``step``'s LoRA in ``folder`` (its optimizer state: the same name with ``.pt``)."""
    return folder / f"step-{step:06d}.safetensors"


def checkpoint_step(path: Path) -> int:
    return int(path.stem.removeprefix("step-"))


def checkpoints(folder: Path) -> list[Path]:
    """Whole checkpoints in ``folder``, by step."""
    return sorted(folder.glob("step-*.safetensors"), key=checkpoint_step) if folder.is_dir() else []
