"""The flow-matching schedule: shift formula, resolution-dependent shift, σ range."""

from __future__ import annotations

import math

import pytest
import torch

from stune.flow import noisy_inputs, resolution_shift, sample_sigmas, shift_sigmas


def test_static_shift_formula() -> None:
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    shifted = shift_sigmas(sigmas, 3.0)
    expected = 3 * sigmas / (1 + 2 * sigmas)
    assert torch.allclose(shifted, expected)
    assert torch.equal(shift_sigmas(sigmas, 0.0), sigmas)  # 0 disables
    assert shifted[2] > sigmas[2]  # shift > 1 moves σ towards noise


def test_resolution_shift_matches_flux_dev_numbers() -> None:
    # FLUX dev scheduler: 256 → 0.5, 4096 → 1.15. 1024² is 4096 tokens, 512² is 1024 tokens.
    assert resolution_shift(4096, 256, 4096, 0.5, 1.15) == pytest.approx(math.exp(1.15))
    assert resolution_shift(1024, 256, 4096, 0.5, 1.15) == pytest.approx(1.88, abs=0.01)


def test_sigmas_are_logit_normal_in_unit_interval() -> None:
    gen = torch.Generator().manual_seed(0)
    sigmas = sample_sigmas(20000, sigmoid_scale=1.0, shift=1.0, generator=gen, device=torch.device("cpu"))
    assert sigmas.min() > 0 and sigmas.max() < 1
    assert sigmas.mean().item() == pytest.approx(0.5, abs=0.01)
    logits = torch.logit(sigmas)
    assert logits.std().item() == pytest.approx(1.0, abs=0.03)


def test_noisy_inputs_interpolate() -> None:
    x = torch.ones(2, 1, 2, 2)
    noise = torch.zeros(2, 1, 2, 2)
    out = noisy_inputs(x, noise, torch.tensor([0.0, 0.75]))
    assert torch.allclose(out[0], x[0]) and torch.allclose(out[1], torch.full_like(x[1], 0.25))


def test_uniform_and_beta_schedules() -> None:
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    uniform = sample_sigmas(20000, sigmoid_scale=1.0, shift=1.0, generator=gen, device=cpu, distribution="uniform")
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert (uniform < 0.1).float().mean().item() == pytest.approx(0.1, abs=0.01)  # flat, unlike logit-normal
    beta = sample_sigmas(
        20000, sigmoid_scale=1.0, shift=1.0, generator=gen, device=cpu, distribution="beta", beta=(2.0, 6.0)
    )
    assert beta.mean().item() == pytest.approx(2 / 8, abs=0.01)  # mean of Beta(2, 6)
    again = sample_sigmas(
        5, sigmoid_scale=1.0, shift=1.0, generator=torch.Generator().manual_seed(3), device=cpu, distribution="beta"
    )
    assert torch.equal(
        again,
        sample_sigmas(
            5, sigmoid_scale=1.0, shift=1.0, generator=torch.Generator().manual_seed(3), device=cpu, distribution="beta"
        ),
    )
