"""Flow-matching noise schedule for training: σ sampling, shift, noisy inputs and targets.

x_t = (1 − σ)·x₀ + σ·ε and the model regresses the velocity v = ε − x₀ (rectified flow, as in
SD3 and FLUX). σ is logit-normal, σ = sigmoid(scale·N(0, 1)), then shifted towards noise by
s·σ / (1 + (s − 1)·σ). With auto shift, s = exp(μ) where μ grows linearly with the number of
image tokens, the same rule the FLUX pipeline uses at inference.
"""

from __future__ import annotations

import math

import torch


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    if shift <= 0 or shift == 1.0:
        return sigmas
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift(seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """exp(μ) with μ linear in the image token count (diffusers' ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (seq_len - base_seq_len)
    return math.exp(mu)


def sample_sigmas(
    batch_size: int,
    *,
    sigmoid_scale: float,
    shift: float,
    generator: torch.Generator,
    device: torch.device,
    distribution: str = "logit-normal",
    beta: tuple[float, float] = (2.0, 2.0),
) -> torch.Tensor:
    """σ per sample from ``distribution`` (logit-normal, uniform or beta), then shifted."""
    if distribution == "uniform":
        sigmas = torch.rand(batch_size, generator=generator, device=device)
    elif distribution == "beta":
        # torch's Beta sampler takes no generator: seed a forked global stream from ours, so the
        # draw is still reproducible and resumable.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            sigmas = torch.distributions.Beta(*beta).sample((batch_size,)).to(device)
    else:
        normal = torch.randn(batch_size, generator=generator, device=device)
        sigmas = torch.sigmoid(sigmoid_scale * normal)
    return shift_sigmas(sigmas, shift)


def noisy_inputs(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - s) * latents + s * noise
