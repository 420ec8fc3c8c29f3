"""Latent Consistency Model multistep sampling (Luo et al. 2023, algorithm 1).

The consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) maps to a clean sample;
every step but the last re-noises it to the next timestep with fresh noise.
"""

from __future__ import annotations

import numpy as np

from sdport.errors import UsageError
from sdport.runtime.schedulers import schedules as S
from sdport.runtime.schedulers.sampler import (
    Sampler,
    add_noise_alpha_bar,
    clip_x0,
    draw_noise,
    identity_input,
    x0_from_alpha_bar,
)
from sdport.runtime.schedulers.schedules import F32, Config, Schedule

SIGMA_DATA = 0.5


def lcm_timesteps(steps: int, num_train_timesteps: int, original_steps: int) -> np.ndarray:
    """(steps,) int64: evenly skipping through the distillation schedule k-1, 2k-1, ..., T-1."""
    if steps > original_steps:
        raise UsageError(
            f"lcm: {steps} steps cannot exceed original_inference_steps={original_steps} "
            "(the distillation schedule); use fewer steps"
        )
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    index = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[index].astype(np.int64)


def _schedule(cfg: Config, steps: int) -> Schedule:
    """Timesteps from the distillation schedule; timestep_spacing has no effect (as in diffusers)."""
    ac = S.alphas_cumprod(cfg)
    ts = lcm_timesteps(steps, cfg["num_train_timesteps"], cfg["original_inference_steps"])
    return Schedule(ts, None, 1.0, 1, steps, ac, S.final_alpha_cumprod(cfg, ac))


def boundary_scalings(t: int, timestep_scaling: float) -> tuple[np.float32, np.float32]:
    """(c_skip, c_out) with c_skip(0) = 1, c_out(0) = 0 (consistency boundary condition)."""
    scaled = F32(t) * F32(timestep_scaling)
    c_skip = SIGMA_DATA**2 / (scaled * scaled + SIGMA_DATA**2)
    c_out = scaled / np.sqrt(scaled * scaled + SIGMA_DATA**2)
    return c_skip, c_out


def lcm_step(cfg: Config, sch: Schedule, i: int, out: np.ndarray, x: np.ndarray, state: None, rng):
    """x_prev = sqrt(alpha_bar_prev) f(x, t) + sqrt(1 - alpha_bar_prev) z, no noise at the end."""
    t = int(sch.timesteps[i])
    last = i == len(sch.timesteps) - 1
    t_prev = t if last else int(sch.timesteps[i + 1])
    # 1. alpha_bar at t and t_prev
    alpha_bar = sch.alphas_cumprod[t]
    alpha_bar_prev = sch.alphas_cumprod[t_prev] if t_prev >= 0 else sch.final_alpha_cumprod
    # 2. consistency function
    c_skip, c_out = boundary_scalings(t, cfg["timestep_scaling"])
    x0 = clip_x0(cfg, x0_from_alpha_bar(cfg["prediction_type"], out, x, alpha_bar))
    denoised = c_out * x0 + c_skip * x
    # 3. re-noise to t_prev
    if last:
        return denoised, None
    z = draw_noise(rng, x.shape)
    return np.sqrt(alpha_bar_prev) * denoised + np.sqrt(1 - alpha_bar_prev) * z, None


LCM = Sampler(
    class_name="LCMScheduler",
    defaults={
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "trained_betas": None,
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "prediction_type": "epsilon",
        "timestep_scaling": 10.0,
        "rescale_betas_zero_snr": False,
        "thresholding": False,
    },
    allowed={"prediction_type": ("epsilon", "v_prediction", "sample"), "thresholding": (False,)},
    schedule=_schedule,
    scale_input=identity_input,
    step=lcm_step,
    add_noise=add_noise_alpha_bar,
    stochastic=True,
)
