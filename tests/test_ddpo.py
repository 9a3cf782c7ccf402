"""The policy-gradient pieces: the stochastic DDIM step is diffusers' and scores its own samples
with the Gaussian's log-density, the clipped objective's gradient is the policy gradient inside
the clip range and nothing outside it, and on a toy policy it raises the reward."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

from easyphoto.diffusion.ddpo import (
    clipped_objective,
    ddim_step,
    group_advantages,
    policy_gradient,
    sample_inpainting,
)
from easyphoto.diffusion.schedulers import strength_timesteps
from easyphoto.engines.models.family import ModelFamily


def _scheduler(tiny: ModelFamily, steps: int = 10) -> DDIMScheduler:
    scheduler = DDIMScheduler.from_config(tiny.scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler


def test_a_ddim_step_with_eta_draws_what_diffusers_draws_and_scores_it(tiny: ModelFamily) -> None:
    scheduler = _scheduler(tiny)
    generator = torch.Generator().manual_seed(0)
    sample, output = (
        torch.randn(3, 4, 8, 8, generator=generator),
        torch.randn(3, 4, 8, 8, generator=generator),
    )
    for timestep in (int(scheduler.timesteps[0]), int(scheduler.timesteps[-1])):
        ours, log_prob = ddim_step(
            scheduler, output, timestep, sample, generator=torch.Generator().manual_seed(5)
        )
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(5))
        step = scheduler.step(output, timestep, sample, eta=1.0, variance_noise=noise)
        torch.testing.assert_close(ours, step.prev_sample, rtol=1e-5, atol=1e-6)
        mean = scheduler.step(
            output, timestep, sample, eta=1.0, variance_noise=torch.zeros_like(noise)
        ).prev_sample
        sigma = float(((ours - mean) / noise).flatten()[0])
        density = torch.distributions.Normal(mean, sigma).log_prob(ours).mean(dim=(1, 2, 3))
        torch.testing.assert_close(log_prob, density, rtol=1e-4, atol=1e-4)
        # The same sample given back scores the same: what the training pass recomputes.
        _, again = ddim_step(scheduler, output, timestep, sample, prev_sample=ours)
        torch.testing.assert_close(again, log_prob)


def test_only_the_masked_latents_count_in_the_log_probability(tiny: ModelFamily) -> None:
    scheduler = _scheduler(tiny)
    generator = torch.Generator().manual_seed(1)
    sample, output = (
        torch.randn(2, 4, 8, 8, generator=generator),
        torch.randn(2, 4, 8, 8, generator=generator),
    )
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    timestep = int(scheduler.timesteps[3])
    drawn, log_prob = ddim_step(scheduler, output, timestep, sample, generator=generator, mask=mask)
    elsewhere = drawn + 5 * (1 - mask)  # the known latents, replaced after the step anyway
    _, same = ddim_step(scheduler, output, timestep, sample, prev_sample=elsewhere, mask=mask)
    torch.testing.assert_close(same, log_prob)
    inside = drawn + 5 * mask
    _, lower = ddim_step(scheduler, output, timestep, sample, prev_sample=inside, mask=mask)
    assert torch.all(lower < log_prob - 1)


def test_the_clipped_objective_is_the_policy_gradient_inside_the_clip_and_zero_outside() -> None:
    log_prob = torch.zeros(4, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 2.0, 0.5])
    clipped_objective(log_prob, torch.zeros(4), advantages, 0.1).backward()
    assert log_prob.grad is not None
    torch.testing.assert_close(log_prob.grad, -advantages / 4)  # ratio 1: -A d(log p), averaged
    moved = torch.tensor([0.5, -0.5, -0.5, 0.5], requires_grad=True)  # ratios e^0.5 and e^-0.5
    clipped_objective(moved, torch.zeros(4), torch.tensor([1.0, -1.0, 1.0, -1.0]), 0.1).backward()
    assert moved.grad is not None
    # Past the clip in the advantage's direction: no push further. Against it: the full gradient.
    assert moved.grad[0] == 0 and moved.grad[1] == 0
    assert moved.grad[2] < 0 and moved.grad[3] > 0


def test_advantages_are_normalised_within_each_group() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 7.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    advantages = group_advantages(rewards, groups)
    torch.testing.assert_close(advantages[:3], torch.tensor([-1.2247, 0.0, 1.2247]), rtol=1e-4, atol=1e-4)
    assert torch.all(advantages[3:] == 0)  # equal rewards, and a group of one: nothing to learn


def test_the_estimator_raises_a_toy_reward() -> None:
    """A Gaussian policy N(mu, 1) per group, reward -(x - 3)^2: a few clipped policy-gradient
    steps from samples of the old policy move mu to 3."""
    mu = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.SGD([mu], lr=0.3)
    generator = torch.Generator().manual_seed(0)
    groups = torch.tensor([0] * 16 + [1] * 16)
    for _ in range(40):
        with torch.no_grad():
            x = mu.repeat_interleave(16) + torch.randn(32, generator=generator)
            old = torch.distributions.Normal(mu.repeat_interleave(16), 1.0).log_prob(x)
            advantages = group_advantages(-((x - 3) ** 2), groups)
        for _ in range(2):  # two updates from one batch of samples: the ratio moves off 1
            optimizer.zero_grad()
            new = torch.distributions.Normal(mu.repeat_interleave(16), 1.0).log_prob(x)
            clipped_objective(new, old, advantages, 0.2).backward()
            optimizer.step()
    torch.testing.assert_close(mu.detach(), torch.tensor([3.0, 3.0]), rtol=0, atol=0.5)


def test_inpainting_trajectories_and_their_policy_gradient_raise_a_toy_reward(tiny: ModelFamily) -> None:
    """The whole loop on a policy of 4 numbers (a noise prediction per latent channel): sample
    inpaintings, reward each by its masked latents' mean, normalise, step along the clipped
    objective of every step. The reward rises, and the known latents never move."""
    scheduler = DDIMScheduler.from_config(tiny.scheduler_config)
    timesteps = strength_timesteps(scheduler, 10, 0.5)
    bias = torch.zeros(1, 4, 1, 1, requires_grad=True)
    optimizer = torch.optim.Adam([bias], lr=0.05)
    known = torch.zeros(16, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, 1:3] = 1

    def policy(latents: torch.Tensor, timestep: int) -> torch.Tensor:
        return latents * 0.1 + bias

    generator = torch.Generator().manual_seed(0)
    means = []
    for _ in range(25):
        noise = torch.randn(known.shape, generator=generator)
        trajectory = sample_inpainting(scheduler, timesteps, policy, known, noise, mask, generator)
        assert torch.equal(trajectory.final * (1 - mask), known * (1 - mask))  # the known latents
        rewards = (trajectory.final * mask).sum(dim=(1, 2, 3)) / (4 * mask.sum())
        means.append(float(rewards.mean()))
        optimizer.zero_grad()
        policy_gradient(trajectory, policy, group_advantages(rewards, torch.zeros(16, dtype=torch.long)), 0.2)
        optimizer.step()
    assert sum(means[-5:]) / 5 > sum(means[:5]) / 5 + 0.3, means
    assert bool(torch.all(bias < 0))  # less noise predicted: the clean latents come out larger
