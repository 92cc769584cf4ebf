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


def pchip(knots: torch.Tensor, values: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The monotone cubic (Fritsch–Carlson PCHIP) through ``(knots, values)`` evaluated at ``at``: it never
    overshoots the data, so non-negative weights give a non-negative density."""
    h = knots[1:] - knots[:-1]
    delta = (values[1:] - values[:-1]) / h
    d = torch.zeros_like(values)
    if len(values) == 2:
        d[:] = delta[0]
    else:
        w1, w2 = 2 * h[1:] + h[:-1], h[1:] + 2 * h[:-1]
        same = delta[:-1] * delta[1:] > 0
        harmonic = (w1 + w2) / (
            w1 / delta[:-1].where(same, torch.ones_like(delta[:-1]))
            + w2 / delta[1:].where(same, torch.ones_like(delta[1:]))
        )
        d[1:-1] = torch.where(same, harmonic, torch.zeros_like(harmonic))
        for end, (h0, h1, m0, m1) in (
            (0, (h[0], h[1], delta[0], delta[1])),
            (-1, (h[-1], h[-2], delta[-1], delta[-2])),
        ):
            slope = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
            if slope * m0 <= 0:
                slope = torch.zeros_like(slope)
            elif m0 * m1 <= 0 and abs(slope) > abs(3 * m0):
                slope = 3 * m0
            d[end] = slope
    i = torch.clamp(torch.searchsorted(knots, at, right=True) - 1, 0, len(h) - 1)
    t = (at - knots[i]) / h[i]
    h00, h10, h01, h11 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t, -2 * t**3 + 3 * t**2, t**3 - t**2
    return h00 * values[i] + h10 * h[i] * d[i] + h01 * values[i + 1] + h11 * h[i] * d[i + 1]


def cubic_sigmas(
    weights: list[float], batch_size: int, *, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """σ drawn from the density through ``weights`` (evenly spaced over [0, 1], joined by :func:`pchip`),
    by inverting its cumulative distribution on a fine grid."""
    values = torch.tensor(weights, dtype=torch.float64)
    knots = torch.linspace(0, 1, len(values), dtype=torch.float64)
    grid = torch.linspace(0, 1, 4097, dtype=torch.float64)
    density = pchip(knots, values, grid).clamp_min(0)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((density[1:] + density[:-1]) / 2, 0)])
    cdf = cdf / cdf[-1]
    u = torch.rand(batch_size, generator=generator, device=device).double().cpu()
    j = torch.clamp(torch.searchsorted(cdf, u), 1, len(grid) - 1)
    lo, hi = cdf[j - 1], cdf[j]
    frac = ((u - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    sigmas = grid[j - 1] + frac * (grid[j] - grid[j - 1])
    return sigmas.to(device=device, dtype=torch.float32)


def noisy_inputs(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - s) * latents + s * noise


# -- the loss --------------------------------------------------------------------------------------------


def huber_c(sigmas: torch.Tensor, base: float, schedule: str) -> torch.Tensor:
    """The per-sample transition point c of the Huber losses, defined over σ (flow matching).

    SimpleTuner (after kohya's scheduled Huber loss) defines c over DDPM timesteps; with σ in its
    place (σ = t/1000, x_t = (1 − σ)·x₀ + σ·ε): ``exponential`` exp(ln(c₀)·σ) = c₀^σ, the same
    curve with t = 1000σ; ``snr`` c₀ + (1 − c₀)/(1 + σ/(1 − σ))² = c₀ + (1 − c₀)(1 − σ)², the
    DDPM formula with its noise-to-signal ratio √((1 − ᾱ)/ᾱ) replaced by flow's σ/(1 − σ);
    ``constant`` c₀. Both schedules give 1 for a clean sample and c₀ at pure noise.
    """
    sigmas = sigmas.float()
    if schedule == "exponential":
        return torch.pow(torch.full_like(sigmas, base), sigmas)
    if schedule == "snr":
        return base + (1.0 - base) * (1.0 - sigmas).square()
    return torch.full_like(sigmas, base)


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, loss_type: str, base_c: float, schedule: str
) -> torch.Tensor:
    """The unreduced loss of ``prediction`` against ``target`` (fp32): l2 (e²), huber (2c(√(e²+c²) − c))
    or smooth_l1 (2(√(e²+c²) − c)), with c per sample from :func:`huber_c`."""
    error = prediction.float() - target.float()
    if loss_type == "l2":
        return error.square()
    c = huber_c(sigmas, base_c, schedule).view(-1, *([1] * (error.ndim - 1)))
    smooth = 2.0 * (torch.sqrt(error.square() + c.square()) - c)
    return c * smooth if loss_type == "huber" else smooth
