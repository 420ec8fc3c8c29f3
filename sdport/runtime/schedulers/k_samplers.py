"""k-diffusion samplers over sigma (Karras et al. 2022): LMS, Euler, Euler ancestral, Heun.

x = x0 + sigma * eps; the model sees x / sqrt(sigma^2 + 1) and the (possibly fractional)
timestep whose sigma this is. Each step integrates dx/dsigma = (x - x0) / sigma.
"""

from __future__ import annotations

import math

import numpy as np

from sdport.runtime.schedulers import schedules as S
from sdport.runtime.schedulers.sampler import (
    Sampler,
    add_noise_sigma,
    clip_x0,
    draw_noise,
    karras_input,
    x0_from_sigma,
)
from sdport.runtime.schedulers.schedules import F32, LINEAR_BETAS, Config, Schedule

_COMMON = {
    **LINEAR_BETAS,
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}
_KARRAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}
_ALLOWED = {
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
}


def spaced_sigmas(
    cfg: Config, steps: int, round_karras_timesteps: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float32 timesteps (N,), float32 sigmas (N + 1,), alpha_bar): spaced, or Karras. Karras
    timesteps are fractional, or float64 rounded with `round_karras_timesteps` (KDPM2's)."""
    ac = S.alphas_cumprod_for_sigmas(cfg)
    table = S.sigma_table(ac)
    ts = S.spaced_timesteps(cfg["timestep_spacing"], steps, cfg["num_train_timesteps"], cfg["steps_offset"])
    ts = ts.astype(F32)
    sigmas = S.interp_sigmas(ts, table)
    if cfg.get("use_karras_sigmas", False):
        # Karras between the ends of the spaced sigmas, unless the config pins them.
        sigma_min = cfg.get("sigma_min") if cfg.get("sigma_min") is not None else sigmas[-1]
        sigma_max = cfg.get("sigma_max") if cfg.get("sigma_max") is not None else sigmas[0]
        sigmas = S.karras_sigmas(steps, float(sigma_min), float(sigma_max))
        ts = S.sigma_to_t(sigmas, np.log(table))
        ts = ts.round() if round_karras_timesteps else ts.astype(F32)
    return ts, S.append_zero(sigmas), ac


def init_sigma(cfg: Config, sigmas: np.ndarray) -> float:
    """sigma_max, or sqrt(sigma_max^2 + 1) for leading spacing (diffusers' convention)."""
    sigma_max = sigmas.max()
    if cfg["timestep_spacing"] == "leading":
        return np.sqrt(sigma_max * sigma_max + 1)
    return sigma_max


def _schedule(cfg: Config, steps: int) -> Schedule:
    """One model evaluation per sigma."""
    ts, sigmas, ac = spaced_sigmas(cfg, steps)
    return Schedule(ts, sigmas, init_sigma(cfg, sigmas), 1, steps, ac, F32(1.0))


def _heun_schedule(cfg: Config, steps: int) -> Schedule:
    """Every sigma but the first and the final 0 appears twice: 2N - 1 evaluations."""
    ts, sigmas, ac = spaced_sigmas(cfg, steps)
    sigmas = np.concatenate([sigmas[:1], np.repeat(sigmas[1:-1], 2), sigmas[-1:]])
    ts = np.concatenate([ts[:1], np.repeat(ts[1:], 2)])
    return Schedule(ts, sigmas, init_sigma(cfg, sigmas), 2, steps, ac, F32(1.0))


# --- steps ---------------------------------------------------------------------------------


def euler_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: None, rng: None):
    """x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i,  d_i = (x_i - x0) / sigma_i."""
    sigma = sch.sigmas[i]
    x0 = x0_from_sigma(cfg["prediction_type"], out, x, sigma)
    d = (x - x0) / sigma
    return x + d * (sch.sigmas[i + 1] - sigma), None


def ancestral_sigmas(sigma: np.ndarray, sigma_to: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sigma_up, sigma_down) of an ancestral step from sigma to sigma_to, in the inputs' float
    type: sigma_down^2 + sigma_up^2 = sigma_to^2."""
    sigma_up = np.sqrt(sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma))
    return sigma_up, np.sqrt(sigma_to * sigma_to - sigma_up * sigma_up)


def euler_ancestral_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: None, rng):
    """Euler down to sigma_down, then add sigma_up noise, sigma_down^2 + sigma_up^2 = sigma_{i+1}^2."""
    sigma, sigma_to = sch.sigmas[i], sch.sigmas[i + 1]
    x0 = x0_from_sigma(cfg["prediction_type"], out, x, sigma)
    sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_to)
    d = (x - x0) / sigma
    x_next = x + d * (sigma_down - sigma)
    return x_next + draw_noise(rng, x.shape) * sigma_up, None


def heun_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state, rng: None):
    """Heun's method over pairs of evaluations; state (d, dt, x) carries the first half.

    First half: Euler to sigmas[i + 1]. Second half: average d with the slope there and redo the
    step from the saved x. The final step (to sigma 0) is plain Euler.
    """
    prediction = cfg["prediction_type"]
    if state is None:
        sigma, sigma_next = sch.sigmas[i], sch.sigmas[i + 1]
        x0 = clip_x0(cfg, x0_from_sigma(prediction, out, x, sigma))
        d = (x - x0) / sigma
        dt = sigma_next - sigma
        return x + d * dt, (d, dt, x)
    d_first, dt, x_start = state
    sigma_next = sch.sigmas[i]
    x0 = clip_x0(cfg, x0_from_sigma(prediction, out, x, sigma_next))
    d = (d_first + (x - x0) / sigma_next) / 2
    return x_start + d * dt, None


def lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial for node sigma_{i-j}.

    diffusers integrates numerically (scipy quad). The integrand is a polynomial of degree
    order - 1 <= 3, which two-point Gauss-Legendre integrates exactly. In plain floats a step's
    four coefficients take 6 us; built as np.poly1d polynomials they took 500 us (a tiny model's
    whole UNet step is 1.4 ms, an SD 1.5 one's on a GPU 15-20 ms). On random sigma tables they
    were also further from a float64 quad: up to 2e-5 relative (cancellation in the
    antiderivative), against 7e-15.
    """
    nodes = [float(sigmas[i - k]) for k in range(order)]

    def basis(s: float) -> float:
        value = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                value *= (s - node) / (nodes[j] - node)
        return value

    start, end = float(sigmas[i]), float(sigmas[i + 1])
    half, middle = (end - start) / 2, (start + end) / 2
    offset = half / math.sqrt(3.0)
    return half * (basis(middle - offset) + basis(middle + offset))


def lms_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: tuple, rng: None):
    """Linear multistep of order <= 4 over the past slopes d (state: the last 4, oldest first)."""
    sigma = sch.sigmas[i]
    x0 = x0_from_sigma(cfg["prediction_type"], out, x, sigma)
    ds = (*state, (x - x0) / sigma)[-4:]
    order = min(i + 1, 4)  # diffusers counts from the schedule's start, even for img2img
    coeffs = [lms_coefficient(sch.sigmas, order, i, j) for j in range(order)]
    return x + sum(c * d for c, d in zip(coeffs, reversed(ds))), ds


LMS = Sampler(
    class_name="LMSDiscreteScheduler",
    defaults={**_COMMON, **_KARRAS},
    allowed=_ALLOWED,
    schedule=_schedule,
    scale_input=karras_input,
    step=lms_step,
    add_noise=add_noise_sigma,
    state0=(),
)

EULER = Sampler(
    class_name="EulerDiscreteScheduler",
    defaults={
        **_COMMON,
        **_KARRAS,
        "rescale_betas_zero_snr": False,
        "sigma_min": None,
        "sigma_max": None,
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    },
    allowed={
        **_ALLOWED,
        "interpolation_type": ("linear",),
        "timestep_type": ("discrete",),
        "final_sigmas_type": ("zero",),
    },
    schedule=_schedule,
    scale_input=karras_input,
    step=euler_step,
    add_noise=add_noise_sigma,
)

EULER_ANCESTRAL = Sampler(
    class_name="EulerAncestralDiscreteScheduler",
    defaults={**_COMMON, "rescale_betas_zero_snr": False},
    allowed={"prediction_type": ("epsilon", "v_prediction")},
    schedule=_schedule,
    scale_input=karras_input,
    step=euler_ancestral_step,
    add_noise=add_noise_sigma,
    stochastic=True,
)

HEUN = Sampler(
    class_name="HeunDiscreteScheduler",
    defaults={
        **_COMMON,
        **_KARRAS,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
        "clip_sample_range": 1.0,
    },
    allowed=_ALLOWED,
    schedule=_heun_schedule,
    scale_input=karras_input,
    step=heun_step,
    add_noise=add_noise_sigma,
)
