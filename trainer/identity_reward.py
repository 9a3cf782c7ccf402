"""Identity-reward fine-tuning of the merged LoRA: the EasyPhoto paper's reinforcement learning on
the user's LoRA with a face-identity reward, DDPO-style (``diffusion/ddpo.py``).

Each iteration samples ``reward_samples_per_template`` inpaintings of every validation template
with the current weights and a stochastic DDIM (eta 1), keeping each step's input, draw and
log-probability; rewards each output by its face's identity score against the training faces;
normalises the rewards per template; and for each template takes one AdamW step on the UNet's
LoRA along the clipped importance-ratio objective summed over the steps. The reward is measured
before and after on the same seeds, and the pre-RL LoRA is kept unless it rose.

Bounded by ``reward_iterations`` and ``reward_max_seconds``; resumable like every stage: after each
iteration its LoRA and optimizer are checkpointed in ``<job>/reward/`` and ``reward.json`` records
the iterations done, and every random draw of iteration ``n`` is seeded by (seed, n), so a job
killed mid-stage resumes where it was and ends as it would have.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from easyphoto.diffusion.ddpo import NoiseFn, Trajectory, group_advantages, policy_gradient, sample_inpainting
from easyphoto.diffusion.inpaint import binarize_mask
from easyphoto.diffusion.schedulers import strength_timesteps
from easyphoto.engines.interface import ControlInput, Engines
from easyphoto.engines.lora import LoraWeights
from easyphoto.engines.roles.diffusion import UNetModule
from easyphoto.imaging.codec import from_model, to_model
from easyphoto.users.durable import write_atomically

from .lora_training import LoraTrainer, checkpoint_path, step_generator
from .options import TrainingOptions
from .validation import Validator

log = logging.getLogger(__name__)

REWARD_DIR = "reward"
STATE_FILE = "reward.json"
SAMPLE_SALT, EVALUATION_SALT = 7000, 9000
# A reward of one output of template ``index`` (an RGB uint8 image): the identity score by default.
Reward = Callable[[np.ndarray, int], float]


@dataclass
class RewardReport:
    """What the stage did, for the training report and the job's progress."""

    before: float
    after: float
    iterations: list[dict[str, Any]]
    kept: str  # "tuned": the fine-tuned LoRA is published; "pre_rl": the reward did not rise
    stopped_by: str  # "iterations" or "time"
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def progress(self) -> dict[str, Any]:
        """The job record's ``identity_reward`` (the API's ``IdentityRewardProgress``)."""
        values: dict[str, Any] = {
            "before": self.before,
            "mean_rewards": [record["mean_reward"] for record in self.iterations],
            "kept": self.kept,
        }
        if self.kept:
            values["after"] = self.after
        return values


@dataclass
class _Batch:
    """One template's samples: how they were drawn, and their rewards."""

    index: int
    trajectory: Trajectory
    rewards: torch.Tensor


class IdentityRewardTuner:
    def __init__(
        self,
        trainer: LoraTrainer,
        validator: Validator,
        options: TrainingOptions,
        seed: int,
        job_folder: Path,
        reward: Reward | None = None,
        on_iteration: Callable[[RewardReport], None] | None = None,
        raise_if_stopped: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.trainer = trainer
        self.validator = validator
        self.options = options
        self.seed = seed
        self.folder = job_folder / REWARD_DIR
        self.reward = reward or validator.score
        self.on_iteration = on_iteration
        self.raise_if_stopped = raise_if_stopped
        self.clock = clock
        family = trainer.family
        self.family = family
        self.device = trainer.device
        self.parameters = trainer.parameters["unet"]  # the text encoder's LoRA stays as merged
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=options.reward_learning_rate, weight_decay=options.weight_decay
        )
        self.unet = UNetModule(family.unet)  # the role's module, called with gradients
        self.engines = self._engines()

    def _engines(self) -> Engines:
        """The validator's engines (fp32, over the job's weights) with a fresh prompt cache: what
        runs everything that needs no gradient (the VAE, the text encoder, the ControlNets)."""
        return Engines(
            self.validator.backend, self.family.tokenizer, float(self.family.vae.config.scaling_factor)
        )

    # ---- the stage ----

    def run(self, merged: LoraWeights) -> tuple[LoraWeights, RewardReport]:
        """The LoRA to publish (fine-tuned, or ``merged`` when the reward did not rise) and the report."""
        state = self._read_state()
        done = self._resume(state)
        if not done:
            self.trainer.load_lora(merged)
        self.trainer.eval()
        self.engines = self._engines()  # the text encoder's LoRA is now the merged one's
        if state["before"] is None:
            state["before"] = self.evaluate()
            self._write_state(state)
        stopped_by = "iterations"
        for iteration in range(done + 1, self.options.reward_iterations + 1):
            if state["seconds"] >= self.options.reward_max_seconds:
                stopped_by = "time"
                break
            self.raise_if_stopped()
            started = self.clock()
            record = self.iteration(iteration)
            self.trainer.save_checkpoint(self.folder, iteration, self.optimizer)
            record["seconds"] = self.clock() - started
            state["seconds"] += record["seconds"]
            state["iterations"].append(record)
            self._write_state(state)
            if self.on_iteration is not None:
                self.on_iteration(self._report(state, None, "", stopped_by))
        after = self.evaluate()
        tuned = after > state["before"]
        report = self._report(state, after, "tuned" if tuned else "pre_rl", stopped_by)
        outcome = "publishing the tuned LoRA" if tuned else "keeping the pre-RL LoRA"
        log.info(
            "identity reward %.4f -> %.4f in %d iterations: %s",
            report.before, after, len(report.iterations), outcome,
        )  # fmt: skip
        return (self.trainer.lora(merged.name) if tuned else merged), report

    def iteration(self, iteration: int) -> dict[str, Any]:
        """Samples every template, then one update per template; the rewards it sampled."""
        count = self.options.reward_samples_per_template
        batches = [
            self.sample(index, count, step_generator(self.seed, iteration, SAMPLE_SALT + index))
            for index in range(len(self.validator.templates))
        ]
        rewards = torch.cat([batch.rewards for batch in batches])
        groups = torch.arange(len(batches)).repeat_interleave(count)
        advantages = group_advantages(rewards, groups).split(count)
        self.trainer.train()
        for batch, advantage in zip(batches, advantages, strict=True):
            self.raise_if_stopped()
            self.update(batch, advantage)
        self.trainer.eval()
        return {
            "iteration": iteration,
            "mean_reward": float(rewards.mean()),
            "per_template": [float(batch.rewards.mean()) for batch in batches],
        }

    def evaluate(self) -> float:
        """The mean reward of the current weights on fixed seeds (the same before and after)."""
        count = self.options.reward_samples_per_template
        rewards = [
            self.sample(index, count, step_generator(self.seed, 0, EVALUATION_SALT + index)).rewards
            for index in range(len(self.validator.templates))
        ]
        return float(torch.cat(rewards).mean())

    # ---- sampling and updating ----

    def sample(self, index: int, count: int, generator: torch.Generator) -> _Batch:
        """``count`` inpaintings of template ``index`` by the current weights, every step recorded."""
        template = self.validator.templates[index]
        image = to_model(template.image).to(self.device)
        mask = binarize_mask(to_model(template.mask, signed=False).to(self.device))
        scheduler = DDIMScheduler.from_config(self.family.scheduler_config)
        timesteps = strength_timesteps(
            scheduler, self.options.validation_steps, self.options.validation_strength
        )
        # Out of inference mode (clone): the trajectory's latents are the update's inputs.
        moments = self.engines.vae_moments(image).clone()
        known = self.engines.latents_from_moments(moments, generator).expand(count, -1, -1, -1)
        noise = randn_tensor(tuple(known.shape), generator=generator, device=self.device, dtype=known.dtype)
        latent_mask = F.interpolate(mask, size=tuple(known.shape[-2:]))
        trajectory = sample_inpainting(
            scheduler, timesteps, self._policy(index), known, noise, latent_mask, generator
        )
        decoded = self.engines.vae_decode(trajectory.final)
        images = [from_model(row[None]) for row in decoded.float().cpu()]
        return _Batch(index, trajectory, torch.tensor([self.reward(output, index) for output in images]))

    def update(self, batch: _Batch, advantages: torch.Tensor) -> None:
        """One AdamW step on the UNet's LoRA along the clipped objective of the batch's steps."""
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.options.reward_clip_range
        policy_gradient(batch.trajectory, self._policy(batch.index), advantages.to(self.device), clip)
        torch.nn.utils.clip_grad_norm_(self.parameters, self.options.max_grad_norm)
        self.optimizer.step()

    def _policy(self, index: int) -> NoiseFn:
        """The classifier-free-guided noise prediction of the UNet with the LoRA for template
        ``index`` (its ControlNets, which carry no LoRA, run without gradients in the engines)."""
        controls = self.validator.controls(index)
        negative, positive = self.engines.encode_prompts(["", self.options.caption]).clone()  # see sample

        def guided_noise(latents: torch.Tensor, timestep: int) -> torch.Tensor:
            rows = latents.shape[0]
            model_input = torch.cat([latents, latents])
            timesteps = torch.full((2 * rows,), float(timestep), device=self.device)
            hidden = torch.cat([negative.expand(rows, -1, -1), positive.expand(rows, -1, -1)])
            doubled = [ControlInput(c.kind, c.image.expand(2 * rows, -1, -1, -1), c.scale) for c in controls]
            residuals = self.engines.residuals(doubled, model_input, timesteps, hidden)
            (output,) = self.unet(model_input, timesteps, hidden, *(r.clone() for r in residuals))
            uncond, text = output.chunk(2)
            return uncond + self.options.validation_guidance_scale * (text - uncond)

        return guided_noise

    # ---- resuming ----

    def _read_state(self) -> dict[str, Any]:
        path = self.folder / STATE_FILE
        if path.is_file():
            return json.loads(path.read_text())
        return {"before": None, "iterations": [], "seconds": 0.0}

    def _write_state(self, state: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomically(self.folder / STATE_FILE, json.dumps(state).encode())

    def _resume(self, state: dict[str, Any]) -> int:
        """The last iteration whose checkpoint reads back (its weights and optimizer loaded), the
        iterations after it forgotten; 0 when there is none."""
        while state["iterations"]:
            done = int(state["iterations"][-1]["iteration"])
            try:
                self.trainer.load_checkpoint(checkpoint_path(self.folder, done), self.optimizer)
                log.info("identity reward: resuming after iteration %d", done)
                return done
            except Exception as exc:  # a checkpoint the crash left unreadable: the one before
                log.warning("identity reward: iteration %d's checkpoint is unreadable (%s)", done, exc)
                state["seconds"] -= float(state["iterations"].pop()["seconds"])
        return 0

    def _report(self, state: dict[str, Any], after: float | None, kept: str, stopped_by: str) -> RewardReport:
        return RewardReport(
            before=float(state["before"]),
            after=float("nan") if after is None else after,
            iterations=list(state["iterations"]),
            kept=kept,
            stopped_by=stopped_by,
            seconds=float(state["seconds"]),
        )
