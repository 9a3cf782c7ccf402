"""Policy-gradient pieces for fine-tuning a LoRA on a reward (DDPO: Black et al. 2023, "Training
Diffusion Models with Reinforcement Learning"), for the EasyPhoto paper's identity reward.

Denoising is a Markov chain whose every DDIM step with ``eta > 0`` draws ``x_{t-1}`` from a
Gaussian around the model's prediction, so a sample has a log-probability per step under the
current weights. The objective is the clipped importance ratio of those log-probabilities,
weighted by each sample's advantage (its reward normalised within its group: the samples of one
template). Only the masked latents are the model's choice when inpainting (the known ones are
replaced after each step), so log-probabilities are averaged over the mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from .inpaint import put_known_back

LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))
ETA = 1.0  # DDPO's: every DDIM step a Gaussian draw, so every step has a log-probability
# The policy: the (guided) noise prediction for latents at a timestep, by the weights being tuned.
NoiseFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Trajectory:
    """An inpainting batch as the policy drew it: per step the model's input, the draw and its
    log-probability under the weights that drew it; the final latents."""

    scheduler: DDIMScheduler
    timesteps: list[int]
    mask: torch.Tensor  # latent-sized, 1 where the sample is the policy's choice
    inputs: list[torch.Tensor] = field(default_factory=list)
    draws: list[torch.Tensor] = field(default_factory=list)
    log_probs: list[torch.Tensor] = field(default_factory=list)
    final: torch.Tensor = field(default_factory=lambda: torch.empty(0))


def sample_inpainting(
    scheduler: DDIMScheduler,
    timesteps: torch.Tensor,
    policy: NoiseFn,
    known: torch.Tensor,
    noise: torch.Tensor,
    mask: torch.Tensor,
    generator: torch.Generator | None,
) -> Trajectory:
    """Inpaints from ``known`` latents noised by ``noise`` to the first timestep, drawing each step
    with :func:`ddim_step` and putting the known latents (re-noised to the next timestep) back
    outside ``mask`` after it, as the inpainting pass does; every step recorded."""
    rows = known.shape[0]
    trajectory = Trajectory(scheduler, [int(t) for t in timesteps], mask)
    with torch.no_grad():
        latents = scheduler.add_noise(known, noise, timesteps[:1].repeat(rows))
        for step, timestep in enumerate(trajectory.timesteps):
            draw, log_prob = ddim_step(
                scheduler, policy(latents, timestep), timestep, latents, ETA, generator, mask=mask
            )
            trajectory.inputs.append(latents)
            trajectory.draws.append(draw)
            trajectory.log_probs.append(log_prob)
            latents = put_known_back(scheduler, draw, known, noise, timesteps, step, mask)
    trajectory.final = latents
    return trajectory


def policy_gradient(
    trajectory: Trajectory, policy: NoiseFn, advantages: torch.Tensor, clip_range: float
) -> float:
    """Accumulates into the policy's gradients the clipped objective of every step of the
    trajectory (averaged over its steps, one backward pass per step so that no two steps' graphs
    are held at once); the objective's value. The optimizer step is the caller's."""
    total = 0.0
    steps = len(trajectory.timesteps)
    with torch.enable_grad():
        for step, timestep in enumerate(trajectory.timesteps):
            sample = trajectory.inputs[step]
            _, log_prob = ddim_step(
                trajectory.scheduler, policy(sample, timestep), timestep, sample, ETA,
                prev_sample=trajectory.draws[step], mask=trajectory.mask,
            )  # fmt: skip
            loss = clipped_objective(log_prob, trajectory.log_probs[step], advantages, clip_range) / steps
            loss.backward()
            total += float(loss.detach())
    return total


def ddim_step(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timestep: int,
    sample: torch.Tensor,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    prev_sample: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from ``sample`` at ``timestep`` (the scheduler's timesteps set): ``x_{t-1}``
    drawn with ``generator``, or ``prev_sample`` when given (to score it under other weights),
    and its log-probability per row, averaged over ``mask`` (1 where it counts; all by default).
    A step whose variance is 0 (eta 0, or the last step onto alpha 1) is deterministic: log 0."""
    train_steps = int(scheduler.config.num_train_timesteps)
    inference_steps = scheduler.num_inference_steps
    assert inference_steps is not None, "set_timesteps first"
    prev_t = timestep - train_steps // inference_steps
    alphas = scheduler.alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
    alpha = alphas[timestep]
    alpha_prev = alphas[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod.to(sample)
    noise, original = _prediction(scheduler, model_output, sample, alpha)
    variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
    sigma = eta * variance.clamp(min=0).sqrt()
    mean = alpha_prev.sqrt() * original + (1 - alpha_prev - sigma**2).clamp(min=0).sqrt() * noise
    if prev_sample is None:
        draw = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = mean + sigma * draw
    weights = torch.ones_like(sample) if mask is None else mask.expand_as(sample).to(sample)
    axes = tuple(range(1, sample.dim()))
    if float(sigma) == 0.0:
        return prev_sample, torch.zeros(sample.shape[0], device=sample.device, dtype=sample.dtype)
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2 * sigma**2) - torch.log(sigma) - LOG_SQRT_2PI
    return prev_sample, (log_prob * weights).sum(axes) / weights.sum(axes).clamp(min=1)


def _prediction(
    scheduler: DDIMScheduler, model_output: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The predicted noise and clean sample, whichever the model predicts."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        noise = model_output
        original = (sample - (1 - alpha).sqrt() * noise) / alpha.sqrt()
    elif kind == "v_prediction":
        original = alpha.sqrt() * sample - (1 - alpha).sqrt() * model_output
        noise = alpha.sqrt() * model_output + (1 - alpha).sqrt() * sample
    else:
        raise ValueError(f"prediction type {kind!r} is not supported for reward fine-tuning")
    if scheduler.config.clip_sample:
        bound = float(scheduler.config.clip_sample_range)
        original = original.clamp(-bound, bound)
    return noise, original


def clipped_objective(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """The loss to minimise: PPO's clipped surrogate, ``max(-A r, -A clip(r, 1 - e, 1 + e))`` with
    ``r`` the ratio of the new to the sampling-time probability, averaged over the rows."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Each reward less its group's mean, over the group's standard deviation (0 for a group of
    one, or of equal rewards: nothing to learn from it)."""
    advantages = torch.zeros_like(rewards)
    for group in groups.unique():
        members = groups == group
        values = rewards[members]
        spread = values.std(unbiased=False)
        if values.numel() > 1 and float(spread) > 0:
            advantages[members] = (values - values.mean()) / spread
    return advantages
